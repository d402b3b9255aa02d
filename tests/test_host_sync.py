"""The block loop reads device data on the host only through its named sync (on CPU, where ``_sync`` is a
no-op and counting its calls proves nothing).

``HostReadGuard`` runs the loop with every host read trapped: ``.item()``/``float()``/``int()``/``bool()``
(``aten._local_scalar_dense``), ``torch.equal``/``nonzero``/``masked_select`` (they sync on a GPU), and
``.tolist()``/``.numpy()``/``.cpu()``/``__array__``. Reads are allowed only of host-side data: the loop's
host buffers (``status_host``, ``frames_host``), and only once a ``_sync`` has passed since the device last
wrote them, plus other host data (``torch.tensor`` of Python values) and copies of either. The GPU counterpart is the benchmark's self-check under
``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import seams

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default}
DERIVED = {aten.clone.default, aten._to_copy.default}
HOST_METHODS = ("tolist", "numpy", "cpu", "__array__")


def _storage(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class HostReadError(AssertionError):
    pass


class HostReadGuard(TorchDispatchMode):
    def __init__(self, loop):
        super().__init__()
        self.loop = loop
        self.buffers = {_storage(loop.status_host): "status_host", _storage(loop.frames_host): "frames_host"}
        self.dirty: set = set()
        self.host: set = set()
        self.reads: list = []

    def _is_host(self, t):
        key = _storage(t)
        if key in self.buffers:
            if key in self.dirty:
                raise HostReadError(f"{self.buffers[key]} read before the sync that completes its copy")
            return True
        return key in self.host

    def check(self, what, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and not self._is_host(t):
                raise HostReadError(f"host read of a device tensor outside the named sync: {what} on "
                                    f"{tuple(t.shape)} {t.dtype}")
        self.reads.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.check(str(func), [a for a in args if isinstance(a, torch.Tensor)])
        out = func(*args, **kwargs)
        if func is aten.lift_fresh.default:  # torch.tensor(Python values): host data
            self.host.add(_storage(out))
        elif func is aten.copy_.default:  # a device write into a host buffer completes at the next sync
            dst = _storage(args[0])
            if dst in self.buffers and _storage(args[1]) not in self.host:
                self.dirty.add(dst)
        elif func in DERIVED and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            src = _storage(args[0])
            if (src in self.buffers and src not in self.dirty) or src in self.host:
                self.host.add(_storage(out))  # a copy of host data is host data
        return out

    def __enter__(self):
        guard = self

        def named_sync(sync):
            sync()
            guard.dirty.clear()
        self._hook = self.loop.sync_hook(named_sync)
        self._hook.__enter__()
        self._saved = {}
        for name in HOST_METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                guard.check(f"Tensor.{_name}", [t])
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._hook.__exit__(*exc)
        return super().__exit__(*exc)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return seams.tiny_runtime(tmp_path_factory)


def _run_guarded(rt, **kw):
    """Iterate the loop itself under the guard (the caller's code, e.g. concatenating frames, is outside)."""
    lp = rt.loop
    p = rt.prompts[0]
    gen = lp.run(p, seed=0, **kw)
    outs = []
    guard = HostReadGuard(lp)
    while True:
        with guard:
            try:
                out = next(gen)
            except StopIteration:
                break
        outs.append(out)
    return outs, guard


@pytest.fixture(scope="module")
def split(rt):
    return seams.split_twin(rt)


@pytest.mark.parametrize("placement", ["one device", "target apart"])
def test_loop_reads_the_device_only_through_its_named_sync(rt, split, placement):
    """One video over the forced, accepted and rejected paths (decisions forced by the test); on one device
    and through the two-device path (its copies, mirror and late-collected target times)."""
    from sdvg_rt.decide import ACCEPTED, REJECTED, Decision, decide
    rt = rt if placement == "one device" else split
    pat = [None, ACCEPTED, REJECTED]
    seams.set_decide(rt.loop, lambda m, b, s, t, finite=True: Decision(pat[b], "forced") if b else
                     decide(m, b, s, t, finite))
    try:
        outs, guard = _run_guarded(rt, mode="sdvg", tau=0.0)
    finally:
        seams.clear_decide(rt.loop)
    assert [o.record.decision for o in outs] == ["forced", "accepted", "rejected"]
    assert guard.reads  # the status and frames reads were seen (and allowed)


@pytest.mark.parametrize("inject", ["item", "float", "tolist"])
def test_an_extra_host_read_in_a_block_is_caught(rt, inject):
    den = seams.components(rt)["drafter"]
    real = den.denoise_block
    reads = {"item": lambda x: x.sum().item(), "float": lambda x: float(x[0, 0, 0, 0, 0]),
             "tolist": lambda x: x[0, 0, 0].tolist()}

    def with_read(block):
        x = real(block)
        reads[inject](x)
        return x
    den.denoise_block = with_read
    try:
        with pytest.raises(HostReadError, match="outside the named sync"):
            _run_guarded(rt, mode="sdvg", tau=0.0)
    finally:
        del den.denoise_block


def test_reading_the_status_before_the_sync_is_caught(rt):
    lp = rt.loop
    real = lp._sync_status

    def early():  # status read before the sync that completes its copy
        lp.status_host.copy_(lp.status, non_blocking=True)
        float(lp.status_host[2])
        real()
    lp._sync_status = early
    try:
        with pytest.raises(HostReadError, match="before the sync"):
            _run_guarded(rt, mode="sdvg", tau=0.0)
    finally:
        del lp._sync_status
