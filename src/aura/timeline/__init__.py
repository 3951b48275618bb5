"""A self-contained HTML timeline report of a run (``aura chaos --report``, ``aura demo
--report``): what the run sampled of itself once a second, its fault windows, and its
accounting.

    series     the data model (``Timeline``, ``Group``, ``Window``) and its JSON
    sampler    the run's sampler: its own Prometheus files, its broker's queue depths
    queue_probe  the queues' ready messages over AMQP (passive declares), once a second
    records    records/s and latency per second, from the database after the run
    recorder   what a run keeps: its start, its windows (``mark``, ``window``), its sampler
    html       the page (uPlot inlined) and the index over several runs
"""

from aura.timeline.html import (
    IndexEntry,
    render,
    render_index,
    report_directory,
    write_index,
    write_report,
)
from aura.timeline.queue_probe import QueueProbe, probe_source
from aura.timeline.recorder import Recorder
from aura.timeline.sampler import Sampler, Source, metric_source, queue_source
from aura.timeline.series import Group, Timeline, Window

__all__ = [
    "Group",
    "IndexEntry",
    "QueueProbe",
    "Recorder",
    "Sampler",
    "Source",
    "Timeline",
    "Window",
    "metric_source",
    "probe_source",
    "queue_source",
    "render",
    "render_index",
    "report_directory",
    "write_index",
    "write_report",
]
