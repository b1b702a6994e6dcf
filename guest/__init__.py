"""Guest side of vhostmd: ``vm-dump-metrics`` and an API for programs in the VM.

Imports nothing that needs libvirt or psutil (only lxml, through the shared
document parser), so it installs in small guest images.
"""

from vhostmd.guest.api import (
    CpuMetrics,
    MemoryMetrics,
    MetricsDocument,
    get_cpu_metrics,
    get_host_cpu_metrics,
    get_host_mem_metrics,
    get_mem_metrics,
    get_metric,
    get_vm_cpu_metrics,
    get_vm_mem_metrics,
    parse_metrics,
    read_metrics,
    read_vbd,
    read_virtio,
)
from vhostmd.guest.errors import (
    AmbiguousMetric,
    CorruptDisk,
    DiskBusy,
    InvalidDocument,
    InvalidMetricValue,
    MetricNotFound,
    MetricsError,
    NoMetricsDisk,
    NoMetricsFound,
    TransportError,
    VirtioError,
    VirtioTimeout,
)
from vhostmd.guest.prometheus import prometheus_text

__all__ = [
    "AmbiguousMetric",
    "CorruptDisk",
    "CpuMetrics",
    "DiskBusy",
    "InvalidDocument",
    "InvalidMetricValue",
    "MemoryMetrics",
    "MetricNotFound",
    "MetricsDocument",
    "MetricsError",
    "NoMetricsDisk",
    "NoMetricsFound",
    "TransportError",
    "VirtioError",
    "VirtioTimeout",
    "get_cpu_metrics",
    "get_host_cpu_metrics",
    "get_host_mem_metrics",
    "get_mem_metrics",
    "get_metric",
    "get_vm_cpu_metrics",
    "get_vm_mem_metrics",
    "parse_metrics",
    "prometheus_text",
    "read_metrics",
    "read_vbd",
    "read_virtio",
]
