"""Where does ``vocab_parallel_kl_div(..., impl="fused")`` spend its time beyond the two CUDA kernels?

Written when the API's forward+backward took 0.7-1 ms more than its two kernels (H200 and H100, N=8192, bf16); it
showed a stream synchronisation in the row-statistics combination (a tuple index copied to the GPU from pageable
memory) with the GPU idle behind it, since removed: the call is now the kernels plus ~0.06 ms (README, "Fused CUDA
kernel").  Kept as the tool to check that stays true.  For each V this script

1. profiles 5 API forward+backward calls with torch.profiler (CPU + CUDA) and prints the operator table (sorted by
   device time) and, for one call, the chronological list of its GPU kernels / memcpys / memsets: start (µs from
   the first), duration, the gap before it, when the CPU launched it, and the CPU op that launched it, so idle
   gaps and stray kernels are visible; plus that call's CUDA runtime calls (launches, synchronisations);
2. times with CUDA events the two kernels alone, the API forward (no grad / grad enabled) and forward+backward,
   and, to tell a CPU-launch-bound call from a GPU-bound one, 20 calls back to back without synchronising (GPU
   ms/call and wall ms/call) against the CPU time of one call (synchronised before, not after), and lists the
   synchronising calls torch.cuda.set_sync_debug_mode catches in one call;
3. does the same timings with a loss_mask (10 % of rows masked: row_index path), and compares
   ``salt_loss(kd_weight=0.5, temperature=1.0, impl="fused")`` (CE from the KD pass), the same with CE apart
   (``_FUSE_CE_WITH_KD = False``), and naive PyTorch CE + KD (F.cross_entropy + F.kl_div of log_softmax), forward
   + backward, with a profile of one one-pass call.

Every section catches its own errors (traceback printed, the rest goes on); the exit code is 1 if any failed.
Needs torch and salt_megatron only.  About 20-40 s on an H100 (most of it the profiler and the V=131072 naive run).

    PYTHONPATH=. python benchmarks/gpu_profile.py [--rows 8192] [--vocab 32768 131072] [--dtype bf16]
    PYTHONPATH=. python benchmarks/gpu_profile.py --device cpu --rows 64 --vocab 1024     # dry run, CPU kernel
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salt_megatron import fused, kd_loss  # noqa: E402
from salt_megatron.kd_loss import salt_loss, vocab_parallel_kl_div  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_kd_loss import bench_inputs, grad_row_vectors, time_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAILED: list[str] = []


def section(title: str, fn, *args, **kwargs):
    """Run one part of the report; an exception is printed with its traceback and the script goes on."""
    print(f"\n--- {title}", flush=True)
    t0 = time.time()
    try:
        result = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - report and continue
        traceback.print_exc(file=sys.stdout)
        FAILED.append(title)
        print(f"    [{title}: FAILED after {time.time() - t0:.1f} s]", flush=True)
        return None
    print(f"    [{time.time() - t0:.1f} s]", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def back_to_back(fn, device: str, calls: int) -> dict[str, float]:
    """``calls`` calls with no synchronisation between them, then one: per call, the GPU time between events
    recorded before the first and after the last, the wall clock including the final sync, and the CPU time of
    the loop alone (how fast the CPU enqueues when it never waits)."""
    fn()
    sync(device)
    start = end = None
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if end is not None:
        end.record()
    sync(device)
    t2 = time.perf_counter()
    out = {"cpu_loop": (t1 - t0) / calls * 1e3, "wall": (t2 - t0) / calls * 1e3}
    out["gpu"] = start.elapsed_time(end) / calls if start is not None else out["wall"]
    return out


def cpu_launch_ms(fn, device: str, iters: int) -> float:
    """Median CPU time of one call that starts with an idle GPU and is not waited for (perf_counter, no sync
    after): the time to enqueue its work, plus any synchronisation hidden inside it."""
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    return statistics.median(times)


def timing_report(name: str, fn, device: str, iters: int, kernels_ms: float | None = None) -> dict[str, float]:
    """Isolated / back-to-back / CPU-launch times of fn and which of CPU and GPU bounds it."""
    iso = time_ms(fn, iters, device)
    b2b = back_to_back(fn, device, iters)
    cpu = cpu_launch_ms(fn, device, iters)
    print(f"  {name}")
    print(f"    isolated call (events around one call on an idle GPU) {iso:9.3f} ms")
    print(f"    {iters} back to back: GPU {b2b['gpu']:9.3f} ms/call, wall {b2b['wall']:9.3f} ms/call, "
          f"CPU loop {b2b['cpu_loop']:9.3f} ms/call")
    print(f"    CPU time of one call (synchronised before, not after)   {cpu:9.3f} ms")
    if kernels_ms is not None:
        print(f"    the two fused kernels alone                             {kernels_ms:9.3f} ms "
              f"(isolated - kernels = {iso - kernels_ms:.3f} ms, back-to-back GPU - kernels = "
              f"{b2b['gpu'] - kernels_ms:.3f} ms)")
    if device == "cuda":
        if cpu >= 0.9 * b2b["gpu"]:
            verdict = ("CPU-bound: the CPU needs about as long as the GPU per call (launch overhead, or a hidden "
                       "synchronisation: see the sync list)")
        elif iso > 1.15 * b2b["gpu"]:
            verdict = ("GPU-bound back to back, but an isolated call waits on its own launches (the GPU idles "
                       f"~{iso - b2b['gpu']:.3f} ms while the CPU enqueues)")
        else:
            verdict = "GPU-bound (the CPU keeps ahead; the time is in the kernels and the gaps between them)"
        print(f"    -> {verdict}")
    return {"isolated": iso, "cpu": cpu, **{f"b2b_{k}": v for k, v in b2b.items()}}


def sync_report(name: str, fn, device: str) -> None:
    """The synchronising calls torch.cuda.set_sync_debug_mode("warn") reports during one call of fn."""
    if device != "cuda":
        print(f"  {name}: (no CUDA: nothing to check)")
        return
    fn()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    # the C++ warning names no op, but Python attributes it to the line that called it
    messages = [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).strip().splitlines()[0][:120]}"
                for w in caught if "sync" in str(w.message).lower()]
    print(f"  {name}: {len(messages)} synchronising call(s)")
    for text in dict.fromkeys(messages):
        print(f"    {messages.count(text)} x {text}")


# ---------------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------------


def _ev(e, *names, default=None):
    """The first of e.name1(), e.name2(), ... that works (the _KinetoEvent API differs between torch versions)."""
    for name in names:
        attr = getattr(e, name, None)
        if attr is None:
            continue
        try:
            return attr() if callable(attr) else attr
        except Exception:  # noqa: BLE001
            continue
    return default


def _start_ns(e) -> int:
    v = _ev(e, "start_ns")
    return int(v) if v is not None else int(_ev(e, "start_us", default=0)) * 1000


def _dur_ns(e) -> int:
    v = _ev(e, "duration_ns")
    return int(v) if v is not None else int(_ev(e, "duration_us", default=0)) * 1000


def _is_gpu(e) -> bool:
    return "CUDA" in str(_ev(e, "device_type", default="")).upper()


def _activity(e) -> str:
    act = _ev(e, "activity_type")
    if act:
        return str(act)
    name = _ev(e, "name", default="")
    if _is_gpu(e):
        return "gpu_user_annotation" if _ev(e, "is_user_annotation", default=False) else "kernel"
    if _ev(e, "is_user_annotation", default=False):
        return "user_annotation"
    return "cuda_runtime" if name.startswith(("cuda", "cu")) and not name.startswith("cudnn") else "cpu_op"


def _is_runtime(e) -> bool:
    return _activity(e) in ("cuda_runtime", "cuda_driver") or (
        not _is_gpu(e) and _ev(e, "name", default="").startswith(("cudaLaunch", "cuLaunch", "cudaMemcpy",
                                                                   "cudaMemset", "cudaStreamSynchronize",
                                                                   "cudaDeviceSynchronize", "cudaEventSynchronize")))


def print_op_table(prof, row_limit: int = 25) -> None:
    averages = prof.key_averages()
    for key in ("device_time_total", "cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
        try:
            try:
                table = averages.table(sort_by=key, row_limit=row_limit, max_name_column_width=70)
            except TypeError:  # no max_name_column_width
                table = averages.table(sort_by=key, row_limit=row_limit)
        except Exception as exc:  # noqa: BLE001 - try the next column name
            print(f"  (table sorted by {key!r} failed: {exc!r})")
            continue
        print(f"  operators sorted by {key} ({row_limit} rows):")
        print(table)
        return
    print("  (no operator table)")


def print_timeline(prof, iteration: str, max_rows: int = 80) -> None:
    """The GPU work of the call annotated ``iteration`` in chronological order, with the CPU side that caused it.

    A GPU event belongs to the call when a CUDA runtime call made during the call's CPU time (any thread: the
    backward runs on autograd's device thread) has its correlation id; without ids, the GPU events starting
    between this call's and the next call's CPU start are taken."""
    try:
        events = list(prof.profiler.kineto_results.events())
    except Exception as exc:  # noqa: BLE001
        print(f"  (prof.profiler.kineto_results.events() not available: {exc!r}); trying prof.events()")
        print_timeline_from_function_events(prof, iteration, max_rows)
        return
    marks = [e for e in events if _ev(e, "name", default="") == iteration and not _is_gpu(e)]
    if not marks:
        print(f"  (no CPU annotation {iteration!r} among {len(events)} events)")
        return
    mark = marks[0]
    w0, w1 = _start_ns(mark), _start_ns(mark) + _dur_ns(mark)
    in_window = [e for e in events if not _is_gpu(e) and w0 <= _start_ns(e) <= w1 and e is not mark]
    runtime = sorted((e for e in in_window if _is_runtime(e)), key=_start_ns)
    ops = [e for e in in_window if not _is_runtime(e) and _activity(e) in ("cpu_op", "user_annotation")]
    phases = [e for e in ops if _ev(e, "name", default="") in ("salt_fwd", "salt_bwd")]
    ops = [e for e in ops if e not in phases]

    def enclosing(e, candidates, same_thread=True):
        """The innermost candidate whose [start, end] holds e (on e's thread, when same_thread and known)."""
        s, t = _start_ns(e), _start_ns(e) + _dur_ns(e)
        tid = _ev(e, "start_thread_id")
        best = None
        for c in candidates:
            cs, ce = _start_ns(c), _start_ns(c) + _dur_ns(c)
            if cs <= s and t <= ce and (not same_thread or tid is None or _ev(c, "start_thread_id") == tid):
                if best is None or _dur_ns(c) < _dur_ns(best):
                    best = c
        return best

    def corr(e):
        return _ev(e, "correlation_id", default=0) or 0

    gpu = [e for e in events if _is_gpu(e) and _activity(e) != "gpu_user_annotation"]
    ids = {corr(r) for r in runtime} - {0}
    mine = sorted((e for e in gpu if corr(e) in ids), key=_start_ns)
    how = "matched to this call's CUDA runtime calls by correlation id"
    if not mine and gpu:
        later = [_start_ns(m) for m in events if not _is_gpu(m) and _start_ns(m) > w0
                 and _ev(m, "name", default="").startswith("salt_iter_")]
        w_end = min(later) if later else float("inf")
        mine = sorted((e for e in gpu if w0 <= _start_ns(e) < w_end), key=_start_ns)
        how = "by time window (no correlation ids matched)"
    # which launch made each GPU event: runtime launches with its id, in order (1:1 when the ids are CUPTI's; in
    # order when a torch version gives every launch of one op that op's id)
    launches: dict[int, list] = {}
    for r in runtime:
        if any(key in _ev(r, "name", default="") for key in ("Launch", "Memcpy", "Memset", "launch")):
            launches.setdefault(corr(r), []).append(r)
    used: dict[int, int] = {}
    launch_of = []
    for e in mine:
        cands = launches.get(corr(e), [])
        k = used.get(corr(e), 0)
        used[corr(e)] = k + 1
        launch_of.append(cands[min(k, len(cands) - 1)] if cands else None)

    fwd = [p for p in phases if _ev(p, "name") == "salt_fwd"]
    bwd = [p for p in phases if _ev(p, "name") == "salt_bwd"]
    print(f"  one call ({iteration}): CPU {(w1 - w0) / 1e3:.1f} µs"
          + (f" (forward {_dur_ns(fwd[0]) / 1e3:.1f} µs, backward {_dur_ns(bwd[0]) / 1e3:.1f} µs)"
             if fwd and bwd else "")
          + f"; {len(runtime)} CUDA runtime calls; {len(mine)} GPU events ({how})")
    summary: dict[str, list[float]] = {}
    for r in runtime:
        summary.setdefault(_ev(r, "name", default="?"), []).append(_dur_ns(r) / 1e3)
    if summary:
        print("  CUDA runtime calls of this call (count, total µs, max µs):")
        for name, durs in sorted(summary.items(), key=lambda kv: -sum(kv[1])):
            print(f"    {len(durs):4d}  {sum(durs):9.1f}  {max(durs):8.1f}  {name}")
    if not mine:
        print("  no GPU events for this call (a CPU run, or no CUDA activity recorded); its outermost CPU ops:")
        aten = [o for o in ops if _ev(o, "name", default="").startswith("aten::")]
        top = [o for o in aten if enclosing(o, [c for c in aten if c is not o]) is None]
        for o in sorted(top, key=_start_ns)[:max_rows]:
            print(f"    {(_start_ns(o) - w0) / 1e3:9.1f} µs  {_dur_ns(o) / 1e3:8.1f} µs  {_ev(o, 'name')}")
        return
    origin = _start_ns(mine[0])
    print("  start/launch: µs from the first GPU event's start (launch = the CPU's launch call); gap: idle GPU "
          "time before the event")
    print(f"  {'#':>3s} {'start':>9s} {'dur':>8s} {'gap':>7s} {'launch':>9s} {'phase':5s} "
          f"{'launched by (innermost CPU op)':36s} GPU kernel / memcpy / memset")
    busy = gaps = 0.0
    prev_end = None
    for k, (e, r) in enumerate(zip(mine, launch_of)):
        s, d = _start_ns(e), _dur_ns(e)
        gap = 0.0 if prev_end is None else (s - prev_end) / 1e3
        gap_s = f"{gap:7.1f}"
        if _activity(e) in ("kernel", "gpu_memcpy", "gpu_memset"):  # not a "cuda_sync" (a wait) or the like
            gaps += max(gap, 0.0)
            busy += d / 1e3
            prev_end = s + d if prev_end is None else max(prev_end, s + d)
        else:
            gap_s = f"{_activity(e)[:7]:>7s}"
        launch = f"{(_start_ns(r) - origin) / 1e3:9.1f}" if r is not None else f"{'?':>9s}"
        op = enclosing(r, ops) if r is not None else None
        phase = enclosing(r, phases, same_thread=False) if r is not None else None
        phase_name = {"salt_fwd": "fwd", "salt_bwd": "bwd"}.get(_ev(phase, "name") if phase else "", "")
        if k < max_rows:
            print(f"  {k:3d} {(s - origin) / 1e3:9.1f} {d / 1e3:8.1f} {gap_s} {launch} {phase_name:5s} "
                  f"{(_ev(op, 'name', default='?') if op else '?')[:36]:36s} {_ev(e, 'name', default='?')[:100]}")
    if len(mine) > max_rows:
        print(f"  ... {len(mine) - max_rows} more")
    span = (prev_end - origin) / 1e3 if prev_end is not None else 0.0
    print(f"  GPU: {len(mine)} events, busy {busy:.1f} µs, span {span:.1f} µs (first start to last end), "
          f"idle gaps {gaps:.1f} µs")


def print_timeline_from_function_events(prof, iteration: str, max_rows: int = 80) -> None:
    """Fallback for a torch without kineto_results: prof.events() (FunctionEvent), device events by time."""
    events = list(prof.events())
    marks = [e for e in events if e.name == iteration]
    if not marks:
        print(f"  (no event {iteration!r})")
        return
    w0 = marks[0].time_range.start
    later = [e.time_range.start for e in events if e.name.startswith("salt_iter_") and e.time_range.start > w0]
    w1 = min(later) if later else float("inf")
    gpu = [e for e in events if "CUDA" in str(getattr(e, "device_type", "")).upper()
           and w0 <= e.time_range.start < w1]
    gpu.sort(key=lambda e: e.time_range.start)
    if not gpu:
        print("  (no device events in prof.events())")
        return
    origin, prev_end = gpu[0].time_range.start, None
    print(f"  {'#':>3s} {'start µs':>9s} {'dur µs':>8s} {'gap µs':>7s} kernel")
    for k, e in enumerate(gpu[:max_rows]):
        s, end = e.time_range.start, e.time_range.end
        gap = 0.0 if prev_end is None else s - prev_end
        prev_end = end if prev_end is None else max(prev_end, end)
        print(f"  {k:3d} {s - origin:9.1f} {end - s:8.1f} {gap:7.1f} {e.name[:90]}")


def profile_calls(fn_annotated, device: str, iters: int = 5, warmup: int = 3, show: int = 2,
                  row_limit: int = 25) -> None:
    """torch.profiler over ``iters`` calls (annotated salt_iter_k, no synchronisation between them): the operator
    table, then the timeline of call ``show``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(warmup):
        fn_annotated()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(iters):
            with record_function(f"salt_iter_{k}"):
                fn_annotated()
        sync(device)
    print_op_table(prof, row_limit)
    print_timeline(prof, f"salt_iter_{min(show, iters - 1)}")


# ---------------------------------------------------------------------------------------------------------------
# The report for one vocabulary size
# ---------------------------------------------------------------------------------------------------------------


def report(rows: int, vocab: int, dtype: torch.dtype, tau: float, iters: int, device: str, mask_fraction: float):
    from torch.profiler import record_function

    print(f"\n===== N={rows} V={vocab} {str(dtype).replace('torch.', '')} τ={tau} on {device} =====")
    s, t, grad_out, x, kernels = bench_inputs(rows, vocab, dtype, device)
    g = torch.Generator(device=device).manual_seed(2)
    mask = torch.rand(rows, device=device, generator=g) >= mask_fraction
    labels = torch.randint(0, vocab, (rows,), device=device, generator=g)

    def api_fwd_bwd():
        x.grad = None
        vocab_parallel_kl_div(x, t, temperature=tau, impl="fused").backward(grad_out)

    def api_fwd_bwd_annotated():
        x.grad = None
        with record_function("salt_fwd"):
            kl = vocab_parallel_kl_div(x, t, temperature=tau, impl="fused")
        with record_function("salt_bwd"):
            kl.backward(grad_out)

    def api_fwd_no_grad():
        with torch.no_grad():
            vocab_parallel_kl_div(x, t, temperature=tau, impl="fused")

    def api_fwd_grad_enabled():
        vocab_parallel_kl_div(x, t, temperature=tau, impl="fused")

    def api_masked_fwd_bwd():
        x.grad = None
        vocab_parallel_kl_div(x, t, temperature=tau, impl="fused", loss_mask=mask).backward(grad_out)

    # 1. the profile
    section(f"profile: 5 x API fwd+bwd (V={vocab})", profile_calls, api_fwd_bwd_annotated, device)

    # 2. timings
    vec = grad_row_vectors(kernels, s, t, tau, grad_out)
    out = torch.empty_like(s)
    half = torch.full_like(grad_out, 0.5)

    def kernel_times():
        fwd = time_ms(lambda: kernels.row_stats(s, t, tau), iters, device)
        bwd = time_ms(lambda: kernels.student_grad(s, t, *vec, tau, out), iters, device)
        bwd_split = time_ms(lambda: kernels.student_grad(s, t, *vec, tau, out, teacher_grad_rows=half),
                            iters, device)
        print(f"  row_stats kernel {fwd:.3f} ms, student_grad kernel {bwd:.3f} ms "
              f"(with teacher_grad_rows {bwd_split:.3f} ms); sum {fwd + bwd:.3f} ms")
        return fwd + bwd

    kernels_ms = section(f"kernels alone (V={vocab})", kernel_times)

    def api_times():
        timing_report("API fwd only, no grad", api_fwd_no_grad, device, iters)
        timing_report("API fwd only, grad enabled (no backward)", api_fwd_grad_enabled, device, iters)
        timing_report("API fwd+bwd", api_fwd_bwd, device, iters, kernels_ms)

    section(f"API timings (V={vocab})", api_times)
    def syncs():
        sync_report("API fwd+bwd", api_fwd_bwd, device)
        sync_report("API fwd+bwd with loss_mask", api_masked_fwd_bwd, device)

    section(f"synchronisations in one API call (V={vocab})", syncs)

    # 3. loss_mask and salt_loss
    kept = int(mask.sum())
    section(f"loss_mask path: {rows - kept} of {rows} rows masked (V={vocab})",
            timing_report, "API fwd+bwd with loss_mask", api_masked_fwd_bwd, device, iters,
            kernels_ms * kept / rows if kernels_ms else None)
    x.grad = None
    salt_section(x, t, labels, device, iters)


def salt_section(x, t, labels, device: str, iters: int) -> None:
    from torch.profiler import record_function

    omega = 0.5

    def one_pass():
        x.grad = None
        salt_loss(x, labels, t, kd_weight=omega, temperature=1.0, impl="fused").loss.backward()

    def one_pass_annotated():
        x.grad = None
        with record_function("salt_fwd"):
            loss = salt_loss(x, labels, t, kd_weight=omega, temperature=1.0, impl="fused").loss
        with record_function("salt_bwd"):
            loss.backward()

    def ce_apart():
        saved = kd_loss._FUSE_CE_WITH_KD
        kd_loss._FUSE_CE_WITH_KD = False
        try:
            x.grad = None
            salt_loss(x, labels, t, kd_weight=omega, temperature=1.0, impl="fused").loss.backward()
        finally:
            kd_loss._FUSE_CE_WITH_KD = saved

    def naive():
        x.grad = None
        ce = F.cross_entropy(x, labels)
        kd = F.kl_div(F.log_softmax(x, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        ((1 - omega) * ce + omega * kd).backward()

    def compare():
        with torch.no_grad():
            fused_loss = salt_loss(x, labels, t, kd_weight=omega, temperature=1.0, impl="fused")
            ce = F.cross_entropy(x.float(), labels)
            kd = F.kl_div(F.log_softmax(x.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                          reduction="batchmean")
        print(f"  values: salt_loss one-pass loss {fused_loss.loss.item():.6f} (CE {fused_loss.ce.item():.6f}, KD "
              f"{fused_loss.kd.item():.6f}); fp32 PyTorch CE {ce.item():.6f}, KD {kd.item():.6f}")
        naive_ms = time_ms(naive, iters, device)
        rows = [("salt_loss one-pass CE+KD (fused)", one_pass), ("salt_loss, CE apart (fused KD)", ce_apart)]
        print(f"  {'fwd+bwd':34s} {'isolated ms':>11s} {'x naive':>8s} {'b2b GPU ms':>10s} {'CPU ms':>8s}")
        for name, fn in rows + [("naive F.cross_entropy + F.kl_div", naive)]:
            iso = naive_ms if fn is naive else time_ms(fn, iters, device)
            b2b = back_to_back(fn, device, iters)
            cpu = cpu_launch_ms(fn, device, iters)
            print(f"  {name:34s} {iso:11.3f} {iso / naive_ms:8.3f} {b2b['gpu']:10.3f} {cpu:8.3f}")
        x.grad = None

    section("salt_loss(kd_weight=0.5, τ=1): one-pass CE+KD vs CE apart vs naive PyTorch", compare)
    section("profile: 5 x salt_loss one-pass fwd+bwd", profile_calls, one_pass_annotated, device, row_limit=15)
    section("synchronisations in one salt_loss one-pass call", sync_report, "salt_loss one-pass", one_pass, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--mask-fraction", type=float, default=0.1, help="share of rows the loss_mask drops")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run with the CPU kernel (use small --rows/--vocab)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile (--device cpu for a dry run)")
        return 0
    t_start = time.time()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {sys.version.split()[0]}")
    status = fused.kernel_status()
    print(f"fused kernels: cpu {status['cpu']}\n               cuda {status['cuda']}")
    if fused.kernels_for(args.device) is None:
        print(f"FAIL: the {args.device} kernel is not available")
        return 1
    for vocab in args.vocab:
        section(f"report V={vocab}", report, args.rows, vocab, DTYPES[args.dtype], args.temperature, args.iters,
                args.device, args.mask_fraction)
        if args.device == "cuda":  # this V's tensors went with report's frame
            torch.cuda.empty_cache()
    print(f"\ngpu_profile: {time.time() - t_start:.1f} s; "
          + (f"{len(FAILED)} section(s) FAILED: {', '.join(FAILED)}" if FAILED else "every section ran"))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
