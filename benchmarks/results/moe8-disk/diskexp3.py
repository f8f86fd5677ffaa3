"""Request size vs buffer kind: read 46 experts/layer cold; /proc/diskstats request counts."""
import os, sys, time, re, mmap
from pathlib import Path
import torch
OFF = Path(sys.argv[1])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = [f for f in sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key) if key(f)[1] >= 18]
N = (files[0].stat().st_size + 4095) // 4096 * 4096
def ds():
    for l in open("/proc/diskstats"):
        p = l.split()
        if p[2] == "vda": return int(p[3]), int(p[5])
def buf(kind):
    if kind == "huge":
        n = (N + (2 << 20) - 1) // (2 << 20) * (2 << 20) + (2 << 20)
        mm = mmap.mmap(-1, n); mm.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        # 2 MiB-align the start
        addr = t.data_ptr(); off = (-addr) % (2 << 20)
        t = t[off:off + N]; t.fill_(1); return t
    if kind == "torch":
        t = torch.empty(N, dtype=torch.uint8); t.fill_(1); return t
    mm = mmap.mmap(-1, N); t = torch.frombuffer(mm, dtype=torch.uint8); t.fill_(1); return t
for kind in sys.argv[2:]:
    b = buf(kind); v = memoryview(b.numpy())[:N]
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")
    r0, s0 = ds(); t0 = time.perf_counter()
    for fd in fds:
        d = 0
        while d < N: d += os.preadv(fd, [v[d:]], d)
    dt = time.perf_counter() - t0; r1, s1 = ds()
    for fd in fds: os.close(fd)
    print(kind, f"{len(fds)*N/dt/1e9:.3f} GB/s", f"avg request {(s1-s0)*512/max(1,r1-r0)/1024:.0f} KiB", flush=True)
