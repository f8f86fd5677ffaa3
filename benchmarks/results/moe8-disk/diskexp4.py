"""The engine's own Loader (ring of slots, one thread) on the expert files, cold; diskstats."""
import os, sys, time, re
from pathlib import Path
sys.path.insert(0, "/work/wt/moe8")
import torch
from layercake.offload.loader import Loader
from layercake.offload.tiers import DirectReader, host_buffer, align_up, ALIGN
OFF = Path(sys.argv[1])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = [f for f in sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key) if key(f)[1] >= 18]
def ds():
    for l in open("/proc/diskstats"):
        p = l.split()
        if p[2] == "vda": return int(p[3]), int(p[5])
size = files[0].stat().st_size
for spec in sys.argv[2:]:
    slots_n, consume_ms = map(float, spec.split("/"))
    readers = {j: DirectReader(f) for j, f in enumerate(files)}
    ranges = {j: (0, size) for j in readers}
    slots = [host_buffer(size + ALIGN) for _ in range(int(slots_n))]
    L = Loader(readers, ranges, slots)
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")
    r0, s0 = ds(); t0 = time.perf_counter()
    for j in readers: L.submit(j)
    for j in readers:
        L.wait(j)
        if consume_ms: 
            t = time.perf_counter()
            while time.perf_counter() - t < consume_ms / 1000: pass
        L.free(j)
    dt = time.perf_counter() - t0; r1, s1 = ds()
    L.close()
    print(spec, f"wall {L.bytes_read/dt/1e9:.3f} GB/s loader {L.bytes_read/L.read_s/1e9:.3f} GB/s",
          f"avg request {(s1-s0)*512/max(1,r1-r0)/1024:.0f} KiB", flush=True)
