"""Many prompts at once: ``dreamfusion batch``, on Ray, on a laptop or a cluster.

A batch is a prompt list and one set of run settings. Each prompt becomes one Ray task that runs
exactly what ``dreamfusion generate`` runs (:func:`dreamfusion.pipeline.generate`) into its own
folder ``DIR/<folder>/``, staged so that a folder that exists is a finished run. That makes a batch
resumable (a rerun skips finished folders), fault-isolated (a failed prompt is one row of the
summary) and safe to interrupt (a cancelled run leaves no folder).

One module a part:

* :mod:`~dreamfusion.batch.prompts`: reading the prompt list, each prompt's folder name;
* :mod:`~dreamfusion.batch.manifest`: ``DIR/batch.json``, which tells this batch from another, and
  the state of the run folders;
* :mod:`~dreamfusion.batch.summary`: ``summary.csv``/``summary.json``, the contact sheet, the exit
  status and the closing report;
* :mod:`~dreamfusion.batch.tasks`: Ray: connecting (:func:`~dreamfusion.batch.tasks.ray_session`),
  what a cluster can run, and :func:`~dreamfusion.batch.tasks.run_tasks`, which runs any function
  over a list of arguments with the resources asked for (the quality benchmark uses it too);
* :mod:`~dreamfusion.batch.run`: a batch from end to end (:func:`~dreamfusion.batch.run.run_batch`).

The parts that decide things are pure functions, tested without Ray. Nothing here imports torch
or ray at module level: ``dreamfusion --help`` stays instant and the pure functions work without
the ``cluster`` extra.
"""

from __future__ import annotations


class BatchError(ValueError):
    """Bad input to a batch (prompt file, output folder, cluster, resources): one line for the user."""
