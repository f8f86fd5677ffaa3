"""O_DIRECT vs buffered (page cache, large folios) vs RWF_DONTCACHE reads of the expert files."""
import os, sys, time, re, mmap
from pathlib import Path
OFF = Path(sys.argv[1])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = [f for f in sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key) if key(f)[1] >= 18]
N = (files[0].stat().st_size + 4095) // 4096 * 4096
mm = mmap.mmap(-1, N); v = memoryview(mm)
def ds():
    for l in open("/proc/diskstats"):
        p = l.split()
        if p[2] == "vda": return int(p[3]), int(p[5])
for kind in sys.argv[2:]:
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")
    r0, s0 = ds(); t0 = time.perf_counter(); n = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if kind == "direct" else 0))
        size = f.stat().st_size; d = 0
        while d < (N if kind == "direct" else size):
            if kind == "dontcache":
                k = os.preadv(fd, [v[d:size]], d, 0x80)  # RWF_DONTCACHE
            else:
                k = os.preadv(fd, [v[d:N if kind == "direct" else size]], d)
            if k == 0: break
            d += k
        if kind == "buffered": os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd); n += d
    dt = time.perf_counter() - t0; r1, s1 = ds()
    cached = [l for l in open("/proc/meminfo") if l.startswith("Cached:")][0].split()[1]
    print(kind, f"{n/dt/1e9:.3f} GB/s", f"avg request {(s1-s0)*512/max(1,r1-r0)/1024:.0f} KiB", "Cached kB", cached, flush=True)
