"""Counter-based noise: Philox4x32-10 against Random123's known answers and a pure-Python reference,
the IEEE-only log/sin/cos against libm, Gaussian statistics, keying by (seed, block, step)."""
import math

import pytest
import torch

from sdvg_rt.noise import NoiseStream, _log_u32, _sincos_u32, gaussian_, philox4x32_10, seed_key

M32 = 0xFFFFFFFF


def _philox_py(ctr, key):
    """Plain-integer Philox4x32-10 (Salmon et al. 2011), the independent reference."""
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return tuple(c)


def _t(*xs):
    return [torch.tensor(x, dtype=torch.int64) for x in xs]


@pytest.mark.parametrize("ctr,key,out", [  # Random123 tests/kat_vectors, philox4x32 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, out):
    got = philox4x32_10(*_t(*ctr), *_t(*key))
    assert tuple(int(x) for x in got) == out
    assert _philox_py(ctr, key) == out


def test_philox_matches_python_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (2, 64), generator=g, dtype=torch.int64)
    got = torch.stack(philox4x32_10(*ctr, *key))
    for i in range(64):
        assert tuple(int(x) for x in got[:, i]) == _philox_py(ctr[:, i].tolist(), key[:, i].tolist())


def test_ieee_only_log_and_sincos_match_libm():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 2**32, (20000,), generator=g, dtype=torch.int64)
    w[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    # our polynomials vs libm in float64: both far below the float32 rounding (6e-8) of the output
    assert (_log_u32(w) - torch.log((w + 1).double() / 2**32)).abs().max() < 1e-14
    s, c = _sincos_u32(w)
    a = 2 * math.pi * w.double() / 2**32
    assert (s - torch.sin(a)).abs().max() < 1e-14 and (c - torch.cos(a)).abs().max() < 1e-14


def test_layout_is_box_muller_of_each_counter():
    ns = NoiseStream((1, 16, 1, 2, 2), steps=2, device="cpu")
    ns.set_seed(2**40 + 7)
    out = ns.fill(block=5)
    for step in range(2):
        for i in (0, 3, 15):  # counter (i, block, step, 0), key (seed lo, seed hi)
            w = _philox_py((i, 5, step, 0), ((2**40 + 7) & M32, (2**40 + 7) >> 32))
            z = []
            for a, b in ((w[0], w[1]), (w[2], w[3])):
                r = math.sqrt(-2 * math.log((a + 1) / 2**32))
                z += [r * math.cos(2 * math.pi * b / 2**32), r * math.sin(2 * math.pi * b / 2**32)]
            # float32 output of the same values: within fp32 rounding of |z| <= 6.7
            assert out[step].flatten()[4 * i:4 * i + 4].tolist() == pytest.approx(z, abs=1e-6)


def test_keyed_by_seed_block_step_and_in_place():
    ns = NoiseStream((1, 16, 3, 4, 4), steps=4, device="cpu")
    ptr = ns.out.data_ptr()
    ns.set_seed(1)
    a = ns.fill(2).clone()
    assert torch.equal(ns.fill(2), a)  # pure function of (seed, block, step)
    assert ns.out.data_ptr() == ptr  # written in place
    assert not torch.equal(ns.fill(3)[0], a[0])  # other block
    assert not torch.equal(a[1], a[0])  # other step
    ns.set_seed(2)  # a new seed in the device key tensor, same buffers
    assert not torch.equal(ns.fill(2), a) and ns.out.data_ptr() == ptr
    other = NoiseStream((1, 16, 3, 4, 4), steps=4, device="cpu")
    other.set_seed(1)
    assert torch.equal(other.fill(2), a)  # another stream (the other model) draws the same noise


def test_gaussian_statistics():
    n = 1 << 16
    out = torch.empty(2, n)
    key = seed_key(123)
    gaussian_(out, key, 0, torch.arange(2)[:, None], torch.arange(n // 4)[None, :])
    x = out.double()
    se = 1 / math.sqrt(2 * n)  # standard error of the mean of 2n N(0,1) samples
    assert abs(float(x.mean())) < 5 * se
    assert abs(float(x.std()) - 1) < 5 * math.sqrt(0.5 / (2 * n))
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96 / (2 * n))  # kurtosis 3, var(x^4) = 96
    # tail mass beyond 3 sigma: 0.0027 for a Gaussian
    tail = float((x.abs() > 3).double().mean())
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / (2 * n))
    # neighbouring elements and the two steps are uncorrelated
    assert abs(float((x[0, 1:] * x[0, :-1]).mean())) < 5 / math.sqrt(n)
    assert abs(float((x[0] * x[1]).mean())) < 5 / math.sqrt(n)


def test_seed_range():
    assert seed_key(2**64 - 1).tolist() == [M32, M32]
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError):
            seed_key(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare CPU and GPU bits")
def test_bit_identical_on_cuda():
    cpu = NoiseStream((1, 16, 3, 60, 104), steps=4, device="cpu")
    gpu = NoiseStream((1, 16, 3, 60, 104), steps=4, device="cuda")
    for ns in (cpu, gpu):
        ns.set_seed(987654321)
    assert torch.equal(cpu.fill(6), gpu.fill(6).cpu())
