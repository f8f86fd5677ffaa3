"""Recency: the same expert set read N times back to back (O_DIRECT, the engine's Loader), per pass."""
import os, sys, time, re
from pathlib import Path
sys.path.insert(0, "/tmp/moe8-new")
from layercake.offload.loader import Loader
from layercake.offload.tiers import DirectReader, host_buffer, ALIGN
OFF = Path(sys.argv[1]); first = int(sys.argv[2]); n = int(sys.argv[3])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = [f for f in sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key) if key(f)[1] >= first]
size = files[0].stat().st_size
readers = {j: DirectReader(f) for j, f in enumerate(files)}
os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")
L = Loader(readers, {j: (0, size) for j in readers}, [host_buffer(size + ALIGN) for _ in range(4)])
rates = []
for p in range(n):
    t0 = time.perf_counter(); b0 = L.bytes_read
    for j in readers: L.submit(j)
    for j in readers: L.wait(j); L.free(j)
    rates.append(round((L.bytes_read - b0) / (time.perf_counter() - t0) / 1e9, 3))
L.close()
print(f"{len(files)} files, {len(files)*size/1e9:.2f} GB per pass:", rates)
