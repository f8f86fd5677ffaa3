"""Working-set test: read the first K experts of each layer (loader order), cold guest cache, passes."""
import os, sys, time, re
from pathlib import Path
sys.path.insert(0, "/work/wt/moe8")
from layercake.offload.tiers import host_buffer, align_up
OFF = Path(sys.argv[1])
def key(p):
    m = re.search(r"layer\.(\d+)\.expert\.(\d+)", p.name); return int(m[1]), int(m[2])
files = sorted(OFF.glob("olmoe-6l-*/layer.*.expert.*.bin"), key=key)
N = align_up(files[0].stat().st_size); buf = host_buffer(N + 4096); v = memoryview(buf.numpy())[:N]
for spec in sys.argv[2:]:
    k, passes = map(int, spec.split("x"))
    sel = [f for f in files if key(f)[1] >= 64 - k]
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in sel]
    rates = []
    for _ in range(passes):
        os.sync(); Path("/proc/sys/vm/drop_caches").write_text("1")
        t0 = time.perf_counter()
        for fd in fds:
            d = 0
            while d < N: d += os.preadv(fd, [v[d:]], d)
        rates.append(round(len(fds) * N / (time.perf_counter() - t0) / 1e9, 3))
    for fd in fds: os.close(fd)
    print(f"{k} experts/layer ({len(fds)*N/1e9:.2f} GB):", rates, flush=True)
