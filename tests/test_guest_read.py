"""Guest API against real metrics disk files: good, corrupt, busy, and the C original's."""

from __future__ import annotations

import functools
import struct
import time
from pathlib import Path

import pytest

from vhostmd.document import DocumentError, Metric, render_document
from vhostmd.guest import (
    AmbiguousMetric,
    CorruptDisk,
    DiskBusy,
    InvalidDocument,
    InvalidMetricValue,
    MetricNotFound,
    MetricsError,
    NoMetricsFound,
    api,
    get_host_cpu_metrics,
    get_host_mem_metrics,
    get_metric,
    get_vm_cpu_metrics,
    get_vm_mem_metrics,
    parse_metrics,
    read_metrics,
    read_vbd,
)
from vhostmd.mdisk import (
    DiskBusyError,
    DiskFormatError,
    checksum_signed,
    checksum_unsigned,
)

from daemon_harness import write_disk_image

DATA = Path(__file__).parent / "data"
UPSTREAM_DISK = DATA / "compat" / "upstream-1.2-disk-4k.img"
UUID_7 = "6695eb01-f6a4-8304-79aa-97f2502e193f"
UUID_9 = "a70605c8-7d69-8c44-7e1a-5ecd092cb1e1"

HOST_METRICS = [
    Metric("TotalPhyMem", "uint64", "host", "7962", unit="MiB"),
    Metric("UsedMem", "uint64", "host", "3000"),
    Metric("FreeMem", "uint64", "host", "4962"),
    Metric("PagedInMemory", "uint64", "host", "2367980"),
    Metric("PagedOutMemory", "uint64", "host", "6885044"),
    Metric("PageInRate", "uint64", "host", "12"),
    Metric("PageFaultRate", "uint64", "host", "34"),
    Metric("TotalPhyCPUs", "uint32", "host", "16"),
    Metric("NumCPUs", "uint32", "host", "8"),
    Metric("TotalCPUTime", "real64", "host", "846.6", unit="s"),
    Metric("HostName", "string", "host", "node-1 & <co>"),
    Metric("Greeting", "string", "host", "Grüße"),
]
VM_METRICS = [
    Metric("TotalCPUTime", "real64", "vm", "42.5", "s", 7, UUID_7),
    Metric("TotalCPUTime", "real64", "vm", "69.25", "s", 9, UUID_9),
]
DOCUMENT = render_document(HOST_METRICS + VM_METRICS).encode()
write_disk = functools.partial(write_disk_image, size=8192)




@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return write_disk(tmp_path / "vhostmd0", DOCUMENT)


def test_reads_the_document_byte_for_byte(disk: Path) -> None:
    document = read_vbd(str(disk))
    assert document.raw == DOCUMENT
    assert document.transport == "vbd"
    assert document.source == str(disk)
    assert len(document.metrics) == len(HOST_METRICS) + len(VM_METRICS)


def test_typed_values(disk: Path) -> None:
    document = read_vbd(str(disk))
    assert document.get("NumCPUs") == 8 and isinstance(document.get("NumCPUs"), int)
    assert document.get("TotalCPUTime") == 846.6
    assert document.get("HostName") == "node-1 & <co>"  # escaped on disk, plain here
    assert document.get("Greeting") == "Grüße"
    assert get_metric("PagedInMemory", document=document) == 2367980
    assert get_metric("TotalPhyMem", disk=str(disk)) == 7962  # reads the disk itself


def test_absent_metric_raises_a_clear_lookup_error(disk: Path) -> None:
    with pytest.raises(MetricNotFound, match="NoSuchMetric \\(host\\) is not published") as info:
        get_metric("NoSuchMetric", disk=str(disk))
    assert isinstance(info.value, LookupError)
    with pytest.raises(MetricNotFound):
        get_metric("HostName", "vm", disk=str(disk))
    with pytest.raises(ValueError, match="context"):
        get_metric("HostName", "guest", disk=str(disk))


def test_vm_metric_picks_the_requested_or_own_vm(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = read_vbd(str(disk))
    assert document.get("TotalCPUTime", "vm", uuid=UUID_9) == 69.25
    assert document.get("TotalCPUTime", "vm", uuid=UUID_7.upper()) == 42.5
    with pytest.raises(MetricNotFound, match="of VM 00000000"):
        document.get("TotalCPUTime", "vm", uuid="00000000-0000-0000-0000-000000000000")

    # Two VMs on one shared disk: this VM is the one whose SMBIOS UUID matches.
    uuid_file = tmp_path / "product_uuid"
    monkeypatch.setattr(api, "DMI_PRODUCT_UUID", str(uuid_file))
    with pytest.raises(AmbiguousMetric, match="2 VMs publish TotalCPUTime"):
        document.get("TotalCPUTime", "vm")
    uuid_file.write_text(UUID_9.upper() + "\n")
    assert document.get("TotalCPUTime", "vm") == 69.25


def test_single_vm_document_needs_no_uuid() -> None:
    raw = render_document([*HOST_METRICS, VM_METRICS[0]]).encode()
    assert parse_metrics(raw).get("TotalCPUTime", "vm") == 42.5


def test_memory_and_cpu_groups(disk: Path) -> None:
    document = read_vbd(str(disk))
    mem = get_host_mem_metrics(document)
    assert (mem.total, mem.used, mem.free) == (7962, 3000, 4962)
    assert (mem.paged_in, mem.paged_out) == (2367980, 6885044)
    assert (mem.page_in_rate, mem.page_fault_rate) == (12, 34)
    cpu = get_host_cpu_metrics(document)
    assert (cpu.total_phys_cpus, cpu.num_cpus_utilized, cpu.total_cpu_time) == (16, 8, 846.6)
    vm_cpu = get_vm_cpu_metrics(document, uuid=UUID_7)
    assert (vm_cpu.total_phys_cpus, vm_cpu.num_cpus_utilized, vm_cpu.total_cpu_time) == (
        None,
        None,
        42.5,
    )
    with pytest.raises(MetricNotFound, match="none of the vm memory metrics"):
        get_vm_mem_metrics(document, uuid=UUID_7)
    # The groups can read the disk themselves.
    assert get_host_cpu_metrics(disk=str(disk)).num_cpus_utilized == 8


def test_group_accepts_the_original_readme_names() -> None:
    raw = render_document(
        [
            Metric("FreePhyMem", "uint64", "host", "8124"),
            Metric("NumCPUsUtilized", "uint32", "vm", "4", vm_id=3, uuid=UUID_7),
        ]
    ).encode()
    document = parse_metrics(raw)
    assert get_host_mem_metrics(document).free == 8124
    assert get_vm_cpu_metrics(document).num_cpus_utilized == 4


def test_upstream_c_disk_is_read_unchanged() -> None:
    image = UPSTREAM_DISK.read_bytes()
    stored_sum, length = struct.unpack_from(">II", image, 8)
    content = image[16 : 16 + length]
    # The fact the signed checksum rests on: the C original sums signed chars.
    assert stored_sum == checksum_signed(content) == 0xDDB0 != checksum_unsigned(content)
    document = read_vbd(str(UPSTREAM_DISK))
    assert document.raw == content
    assert document.get("NumCPUs") == 16  # stored as "16\n" by the C original
    assert document.get("HostName") == "compat-host"
    assert document.get("Greeting") == "Grüße"
    assert document.get("TotalCPUTime", "vm") == 42.5
    assert document.find("NumCPUs").unit == "count"
    assert document.find("NumCPUs").raw == "16\n" and document.problems == ()


def test_unsigned_checksum_is_accepted(tmp_path: Path) -> None:
    # Other writers (KubeVirt) store the unsigned sum; a hand-built header.
    content = DOCUMENT
    assert checksum_signed(content) != checksum_unsigned(content)
    header = struct.pack(">4sIII", b"mvbd", 0, checksum_unsigned(content), len(content))
    path = tmp_path / "kubevirt.img"
    path.write_bytes(header + content + b"\0" * 1000)
    assert read_vbd(str(path)).raw == content


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("bad signature", "bad signature"),
        ("length past end", "past the end"),
        ("checksum mismatch", "checksum mismatch"),
    ],
)
def test_corrupt_disks_raise_corrupt_disk(tmp_path: Path, kind: str, match: str) -> None:
    path = tmp_path / "bad.img"
    if kind == "bad signature":
        write_disk(path, DOCUMENT)
        with open(path, "r+b") as image:
            image.write(b"MVBD")
    elif kind == "length past end":
        write_disk(path, DOCUMENT, size=8192, length=8192)
    else:
        write_disk(path, DOCUMENT, checksum=checksum_signed(DOCUMENT) + 1)
    with pytest.raises(CorruptDisk, match=match) as info:
        read_vbd(str(path), timeout=1)
    assert isinstance(info.value, DiskFormatError)  # the shared core error still catches it
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_only_a_document_that_is_not_well_formed_is_refused(tmp_path: Path) -> None:
    truncated = b"<metrics>\n  <metric type='uint32' context='host'>\n"
    path = write_disk(tmp_path / "bad.img", truncated)
    with pytest.raises(InvalidDocument, match="invalid XML") as info:
        read_vbd(str(path))
    assert isinstance(info.value, DocumentError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert str(info.value) == f"{path} line 2: invalid XML: Premature end of data in tag metric"


def test_wrong_root_is_a_problem_not_an_error(tmp_path: Path) -> None:
    path = write_disk(tmp_path / "other.img", b"<notmetrics/>\n")
    document = read_vbd(str(path))
    assert document.metrics == ()
    assert document.problems == (f"{path}: root element is <notmetrics>, expected <metrics>",)
    with pytest.raises(MetricNotFound):
        document.get("NumCPUs")


@pytest.mark.parametrize(
    ("old", "new", "name", "reason"),
    [
        (b"<value>8</value>", b"<value>eight</value>", "NumCPUs", "'eight' is not an integer"),
        (b"<value>16</value>", b"<value>-16</value>", "TotalPhyCPUs", "-16 is out of range"),
        (b"<value>846.6</value>", b"<value>1,5</value>", "TotalCPUTime", "'1,5' is not a number"),
        (b"<value>8</value>", b"<value>8.5</value>", "NumCPUs", "'8.5' has a fractional part"),
        (b"<value>node-1 &amp; &lt;co&gt;</value>", b"<value>\n</value>", "HostName",
         "the value is empty"),
    ],
    ids=["not an integer", "out of range", "not a real", "fraction", "empty string"],
)
def test_one_bad_value_leaves_every_other_metric_readable(
    tmp_path: Path, old: bytes, new: bytes, name: str, reason: str
) -> None:
    assert DOCUMENT.count(old) == 1
    path = write_disk(tmp_path / "bad.img", DOCUMENT.replace(old, new))
    document = read_vbd(str(path))
    assert len(document.metrics) == len(HOST_METRICS) + len(VM_METRICS)
    bad = document.find(name)
    assert bad.raw == new[len(b"<value>"):-len(b"</value>")].decode()
    assert bad.typed is None and bad.problem is not None and reason in bad.problem
    with pytest.raises(InvalidMetricValue, match=f"metric {name} \\(host\\): {reason}") as info:
        document.get(name)
    assert isinstance(info.value, InvalidDocument)  # what callers caught before
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert len(document.problems) == 1 and reason in document.problems[0]
    for metric in HOST_METRICS + VM_METRICS:
        if metric.name != name:
            assert document.get(metric.name, metric.context, uuid=metric.uuid) == (
                metric.typed_value())


# What C daemons write: printf("%f") integers, empty values when virsh failed,
# the action's trailing newline, and whatever else an action printed.
C_STYLE = (
    "<metrics>\n"
    "  <metric type='uint64' context='host'>\n    <name>PageInRate</name>\n"
    "    <value>400.000000\n</value>\n  </metric>\n"
    "  <metric type='uint64' context='host'>\n    <name>PageFaultRate</name>\n"
    "    <value>236.000000</value>\n  </metric>\n"
    "  <metric type='uint64' context='host' unit='MiB'>\n    <name>TotalPhyMem</name>\n"
    "    <value></value>\n  </metric>\n"
    "  <metric type='uint64' context='host'>\n    <name>FreeMem</name>\n"
    "    <value>4962\n</value>\n  </metric>\n"
    "  <metric type='string' context='host'>\n    <name>VirtualizationVendor</name>\n"
    "    <value>\n</value>\n  </metric>\n"
    "  <metric type='string' context='host'>\n    <name>HostName</name>\n"
    "    <value>c-host\n</value>\n  </metric>\n"
    "  <metric type='uint32' context='host'>\n    <name>NumCPUs</name>\n"
    "    <value>8 cpus</value>\n  </metric>\n"
    "  <metric type='group' context='host'>\n    <name>Odd</name>\n"
    "    <value>1,2</value>\n  </metric>\n"
    "  <metric type='real64' context='vm' id='3' uuid='" + UUID_7 + "' unit='s'>\n"
    "    <name>TotalCPUTime</name>\n    <value>\n</value>\n  </metric>\n"
    "</metrics>\n"
).encode()


def test_c_style_disk_delivers_every_metric_with_raw_text_and_reason(tmp_path: Path) -> None:
    path = write_disk(tmp_path / "c-style.img", C_STYLE)
    document = read_vbd(str(path))
    assert document.raw == C_STYLE
    by_name = {m.name: m for m in document.metrics}
    assert len(by_name) == 9
    # Integer decimals: typed as the integer, raw kept as written.
    assert document.get("PageInRate") == 400 and by_name["PageInRate"].raw == "400.000000\n"
    assert by_name["PageInRate"].value == "400"
    assert document.get("PageFaultRate") == 236
    assert document.get("FreeMem") == 4962
    assert document.get("HostName") == "c-host"
    # No typed value, and why; the text is still there.
    expected = {
        "TotalPhyMem": ("", "the value is empty"),
        "VirtualizationVendor": ("\n", "the value is empty"),
        "NumCPUs": ("8 cpus", "'8 cpus' is not an integer"),
        "Odd": ("1,2", "metric type 'group' is not a value type"),
    }
    for name, (raw, reason) in expected.items():
        metric = by_name[name]
        assert (metric.raw, metric.typed, metric.problem) == (raw, None, reason)
        with pytest.raises(InvalidMetricValue, match=reason):
            document.get(name)
    with pytest.raises(InvalidMetricValue, match=r"TotalCPUTime \(vm 3\): the value is empty"):
        document.get("TotalCPUTime", "vm")
    assert len(document.problems) == 5
    assert all(p.startswith(f"{path} line ") for p in document.problems)
    # The libmetrics-style groups: one bad member is None with its reason.
    mem = get_host_mem_metrics(document)
    assert (mem.free, mem.page_in_rate, mem.page_fault_rate, mem.total) == (4962, 400, 236, None)
    assert mem.problems == {"total": "metric TotalPhyMem (host): the value is empty"}
    cpu = get_host_cpu_metrics(document)
    assert cpu.num_cpus_utilized is None and "not an integer" in cpu.problems["num_cpus_utilized"]
    vm_cpu = get_vm_cpu_metrics(document)
    assert vm_cpu.total_cpu_time is None and set(vm_cpu.problems) == {"total_cpu_time"}


def test_busy_forever_gives_a_bounded_error(tmp_path: Path) -> None:
    path = write_disk(tmp_path / "busy.img", DOCUMENT, busy=1)
    started = time.monotonic()
    with pytest.raises(DiskBusy, match=r"still busy after 0\.2 s") as info:
        read_vbd(str(path), timeout=0.2)
    # Bounded (the C original spins forever): it gave up after its 0.2 s, give or
    # take how late a loaded machine wakes it.
    assert time.monotonic() - started < 10
    assert isinstance(info.value, DiskBusyError)


def test_missing_disk_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="No such file"):
        read_vbd(str(tmp_path / "absent"))


def test_without_a_transport_both_are_tried_and_both_reasons_given(tmp_path: Path) -> None:
    bad = write_disk(tmp_path / "bad.img", DOCUMENT, checksum=1)
    with pytest.raises(NoMetricsFound) as info:
        read_metrics(disk=str(bad), port=str(tmp_path / "no-port"), timeout=0.5)
    assert set(info.value.failures) == {"vbd", "virtio"}
    assert isinstance(info.value.failures["vbd"], CorruptDisk)
    assert "vbd: " in str(info.value) and "virtio: " in str(info.value)
    assert "no such port" in str(info.value)


def test_guest_package_needs_neither_libvirt_nor_psutil() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['libvirt'] = None\n"
        "sys.modules['psutil'] = None\n"
        "import vhostmd.guest, vhostmd.guest.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
