"""Request size vs buffer: read K experts cold into buffers of different kinds; smaps AnonHuge."""
import os, sys, time, re, mmap, ctypes
from pathlib import Path
import torch
OFF = Path(sys.argv[1])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = [f for f in sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key) if key(f)[0] < 2]
N = (files[0].stat().st_size + 4095) // 4096 * 4096
H = 2 << 20
def ds():
    for l in open("/proc/diskstats"):
        p = l.split()
        if p[2] == "vda": return int(p[3]), int(p[5])
def anonhuge():
    tot = 0
    for l in open("/proc/self/smaps"):
        if l.startswith("AnonHugePages:"): tot += int(l.split()[1])
    return tot
keep = []
def buf(kind):
    if kind.startswith("huge"):
        mm = mmap.mmap(-1, N + 2 * H); keep.append(mm)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        off = (-t.data_ptr()) % H
        libc = ctypes.CDLL(None)
        libc.madvise(ctypes.c_void_p(t.data_ptr() + off), ctypes.c_size_t(N // H * H + H), 14)
        t = t[off:off + N]
    else:
        mm = mmap.mmap(-1, N); keep.append(mm); t = torch.frombuffer(mm, dtype=torch.uint8)
    if "touch" in kind or kind.startswith("huge"): t.fill_(1)
    return t
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
    print(kind, f"{len(fds)*N/dt/1e9:.3f} GB/s", f"avg request {(s1-s0)*512/max(1,r1-r0)/1024:.0f} KiB", "anonhuge kB", anonhuge(), flush=True)
