"""Disk read patterns on the expert files, cold each pass: which reader is fastest."""
import os, sys, time, json, threading, re
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, "/work/wt/moe8")
from layercake.offload.tiers import DirectReader, host_buffer, align_up

OFF = Path(sys.argv[1])
files = sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"))
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
lorder = sorted(files, key=key)
size = files[0].stat().st_size
N = align_up(size)
bufs = [host_buffer(N + 4096) for _ in range(8)]

def drop():
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")

def one(view_buf, fd, off, n):
    v = memoryview(view_buf.numpy())[:n]; done = 0
    while done < n:
        done += os.preadv(fd, [v[done:]], off + done)
    return n

def pat_probe():  # current probe: sorted glob order, open/close each, one read
    t0 = time.perf_counter(); n = 0
    for f in files:
        r = DirectReader(f); n += r.read_into(bufs[0], 0, N, 4); r.close()
    return n / (time.perf_counter() - t0) / 1e9, None

def pat_loader():  # loader order, fds open, one read each, per-read timing
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in lorder]
    t0 = time.perf_counter(); n = 0; rs = 0.0
    for fd in fds:
        a = time.perf_counter(); n += one(bufs[0], fd, 0, N); rs += time.perf_counter() - a
    w = time.perf_counter() - t0
    for fd in fds: os.close(fd)
    return n / w / 1e9, n / rs / 1e9

def pat_gaps(ms):
    def f():
        fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in lorder]
        t0 = time.perf_counter(); n = 0; rs = 0.0
        for fd in fds:
            a = time.perf_counter(); n += one(bufs[0], fd, 0, N); rs += time.perf_counter() - a
            time.sleep(ms / 1000)
        w = time.perf_counter() - t0
        for fd in fds: os.close(fd)
        return n / w / 1e9, n / rs / 1e9
    return f

def pat_qd(k, split=1):
    def f():
        fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in lorder]
        jobs = []
        step = align_up(-(-N // split))
        for i, fd in enumerate(fds):
            for s in range(split):
                a, b = s * step, min(N, (s + 1) * step)
                jobs.append((i, fd, a, b - a))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as ex:
            n = sum(ex.map(lambda j: one_off(bufs[(j[0] * 1) % 8], j[1], j[2], j[3]), jobs))
        w = time.perf_counter() - t0
        for fd in fds: os.close(fd)
        return n / w / 1e9, None
    return f

def one_off(buf, fd, off, n):
    v = memoryview(buf.numpy())[off:off + n]; done = 0
    while done < n:
        done += os.preadv(fd, [v[done:]], off + done)
    return n

pats = {"probe": pat_probe, "loader": pat_loader, "gap10ms": pat_gaps(10), "qd2": pat_qd(2),
        "split4": pat_qd(4, 4), "qd4": pat_qd(4)}
order = sys.argv[2].split(",") if len(sys.argv) > 2 else list(pats)
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
out = []
for r in range(rounds):
    for p in order:
        drop()
        wall, per = pats[p]()
        out.append((p, round(wall, 3), per and round(per, 3)))
        print(p, round(wall, 3), per and round(per, 3), flush=True)
