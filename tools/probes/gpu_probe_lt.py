"""GPU probe: cuBLASLt called directly (ctypes) at the 14B layer GEMM shapes, against torch.

For each shape (M = 4680 tokens of one block, and M = 9360 for reference):
- torch's call (``F.linear`` / ``_addmm_activation``) as the runtime makes it;
- cuBLASLt with the first heuristic algorithm (what torch's Lt path would take) and the best of up to
  ``NALGO`` heuristic algorithms, each timed;
- the gated residual in the epilogue: D = gate * (x W^T) + 1 * C + gate * b with C = D = the residual
  stream (per-row alpha vector, ``CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST``): whether any
  algorithm supports it, its time, and its error against fp32.

Prints one table; run from tools/probes/ after ``source tools/device_env.sh``.
"""
import ctypes

import torch
import torch.nn.functional as F

from sdvg_rt.floor import cuda_time

NALGO = 24

lt = None


def _lib():
    global lt
    if lt is None:
        torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # torch loads cuBLASLt first
        for line in open("/proc/self/maps"):
            if "libcublasLt.so" in line:
                lt = ctypes.CDLL(line.split()[-1])
                print("cuBLASLt:", line.split()[-1])
                break
        else:
            lt = ctypes.CDLL("libcublasLt.so.13")
        ver = lt.cublasLtGetVersion
        ver.restype = ctypes.c_size_t
        print("cuBLASLt version", ver())
    return lt


def check(st, what):
    if st != 0:
        raise RuntimeError(f"{what}: cublasStatus {st}")


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heur(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


BF16, F32, COMPUTE_32F = 14, 0, 68
OP_N, OP_T = 0, 1
DESC_POINTER_MODE, DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER, DESC_BIAS_DATA_TYPE = 2, 3, 4, 7, 8, 26
EPI_DEFAULT, EPI_BIAS, EPI_GELU_BIAS = 1, 4, 36
PM_HOST, PM_ALPHA_VEC_BETA_HOST = 0, 4
PREF_MAX_WS = 1
WS_BYTES = 32 << 20


def _set(fn, obj, attr, value):
    v = value if isinstance(value, ctypes._SimpleCData) else ctypes.c_int32(value)
    check(fn(obj, attr, ctypes.byref(v), ctypes.sizeof(v)), f"set attr {attr}")


class LtLinear:
    """D[M, N] = epilogue(alpha * x[M, K] W[N, K]^T + beta * C) in torch's row-major terms; in cuBLAS's
    column-major terms D^T [N x M] = op_T(W) x^T, so alpha vectors and biases run along N."""

    def __init__(self, M, K, N, epilogue, alpha_vector=False, beta=0.0):
        L = _lib()
        self.L = L
        self.h = ctypes.c_void_p()
        check(L.cublasLtCreate(ctypes.byref(self.h)), "create")
        self.desc = ctypes.c_void_p()
        check(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, F32), "desc")
        set_desc = L.cublasLtMatmulDescSetAttribute
        _set(set_desc, self.desc, DESC_TRANSA, OP_T)
        _set(set_desc, self.desc, DESC_TRANSB, OP_N)
        _set(set_desc, self.desc, DESC_EPILOGUE, epilogue)
        if epilogue != EPI_DEFAULT:
            _set(set_desc, self.desc, DESC_BIAS_DATA_TYPE, BF16)
        _set(set_desc, self.desc, DESC_POINTER_MODE, PM_ALPHA_VEC_BETA_HOST if alpha_vector else PM_HOST)
        self.alpha_vector, self.beta, self.epilogue = alpha_vector, beta, epilogue

        def layout(rows, cols, ld):
            lay = ctypes.c_void_p()
            check(L.cublasLtMatrixLayoutCreate(ctypes.byref(lay), BF16, ctypes.c_uint64(rows),
                                               ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
            return lay

        self.a, self.b, self.c = layout(K, N, K), layout(K, M, K), layout(N, M, N)
        pref = ctypes.c_void_p()
        check(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        _set(L.cublasLtMatmulPreferenceSetAttribute, pref, PREF_MAX_WS, ctypes.c_uint64(WS_BYTES))
        res = (Heur * NALGO)()
        n = ctypes.c_int(0)
        st = L.cublasLtMatmulAlgoGetHeuristic(self.h, self.desc, self.a, self.b, self.c, self.c, pref, NALGO, res,
                                              ctypes.byref(n))
        self.algos = [res[i] for i in range(n.value) if res[i].state == 0] if st == 0 else []
        self.status = st
        self.ws = torch.empty(WS_BYTES, dtype=torch.uint8, device="cuda")

    def __call__(self, x, w, out, bias=None, alpha=None, c=None, algo=0):
        L = self.L
        if self.epilogue != EPI_DEFAULT:
            p = ctypes.c_void_p(bias.data_ptr())
            check(L.cublasLtMatmulDescSetAttribute(self.desc, DESC_BIAS_POINTER, ctypes.byref(p), 8), "bias")
        a_ptr = ctypes.c_void_p(alpha.data_ptr()) if self.alpha_vector else ctypes.byref(ctypes.c_float(1.0))
        beta = ctypes.c_float(self.beta)
        h = self.algos[algo]
        st = L.cublasLtMatmul(self.h, self.desc, a_ptr, ctypes.c_void_p(w.data_ptr()), self.a,
                              ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(beta),
                              ctypes.c_void_p((c if c is not None else out).data_ptr()), self.c,
                              ctypes.c_void_p(out.data_ptr()), self.c, ctypes.byref(h.algo),
                              ctypes.c_void_p(self.ws.data_ptr()), ctypes.c_size_t(WS_BYTES),
                              ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        check(st, "matmul")


def timeit(fn):
    """us per call: 10 calls back to back per event pair, median of 15."""
    return cuda_time(fn, iters=15, inner=10) * 1e6


def best(lin, call):
    times = []
    for i in range(len(lin.algos)):
        try:
            times.append((timeit(lambda: call(i)), i))
        except RuntimeError as err:
            times.append((float("inf"), i))
            print("  algo", i, err)
    return min(times), times[0][0]


def main():
    torch.manual_seed(0)
    d, f = 5120, 13824
    shapes = (("qk", d, 2 * d, "bias"), ("o", d, d, "gated"), ("cross o", d, d, "bias"),
              ("ffn in", d, f, "gelu"), ("ffn out", f, d, "gated"))
    print(f"{'shape':8s} {'M':>5s} {'torch us':>9s} {'lt[0] us':>9s} {'lt best us':>10s} {'#algos':>6s} "
          f"{'gated lt[0]':>11s} {'gated best':>10s} {'#':>3s} {'gated err':>9s} {'torch err':>9s}")
    tot = {}
    for M in (4680, 9360):
        for name, K, N, kind in shapes:
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            if kind == "gelu":
                t_torch = timeit(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
                lin = LtLinear(M, K, N, EPI_GELU_BIAS)
            else:
                t_torch = timeit(lambda: F.linear(x, w, b))
                lin = LtLinear(M, K, N, EPI_BIAS)
            (t_best, i_best), t0 = best(lin, lambda i: lin(x, w, out, bias=b, algo=i))
            ref = F.linear(x.float(), w.float(), b.float())
            if kind == "gelu":
                ref = F.gelu(ref, approximate="tanh")
            lin(x, w, out, bias=b, algo=i_best)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            g = ""
            if kind == "gated":
                gate = torch.rand(N, device="cuda", dtype=torch.float32) + 0.5
                resid = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                gb = (gate * b.float()).to(torch.bfloat16)
                glin = LtLinear(M, K, N, EPI_BIAS, alpha_vector=True, beta=1.0)
                if glin.algos:
                    stream = resid.clone()
                    (tg, ig), tg0 = best(glin, lambda i: glin(x, w, stream, bias=gb, alpha=gate, c=stream, algo=i))
                    stream.copy_(resid)
                    glin(x, w, stream, bias=gb, alpha=gate, c=stream, algo=ig)
                    gref = resid.float() + gate * ref
                    gerr = ((stream.float() - gref).norm() / (gate * ref).norm()).item()
                    g = f"{tg0:11.0f} {tg:10.0f} {len(glin.algos):3d} {gerr:9.2e}"
                else:
                    g = f"{'none (status ' + str(glin.status) + ')':>25s}"
            print(f"{name:8s} {M:5d} {t_torch:9.0f} {t0:9.0f} {t_best:10.0f} {len(lin.algos):6d} {g} "
                  f"{'':>1s}{err:9.2e}")
            tot.setdefault(M, [0.0, 0.0, 0.0])
            tot[M][0] += t_torch
            tot[M][1] += t0
            tot[M][2] += t_best
            del w, x, out
    for M, (a, b0, c) in tot.items():
        print(f"M={M}: per layer (qk, o, cross o, ffn in, ffn out; cross q = o's time not counted) torch {a:.0f} us, "
              f"lt[0] {b0:.0f} us, lt best {c:.0f} us -> x 40 layers saves {(a - c) * 40 / 1e3:.2f} ms per forward")


def residual_vs_ln():
    """Our residual_ln kernel with and without the residual part at 14B block shapes."""
    from sdvg_rt.models.dit_kernels import residual_ln

    x = torch.randn(3, 1560, 5120, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    mod = torch.randn(3, 6, 5120, device="cuda", dtype=torch.bfloat16) * 0.1
    g, sh, sc = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
    t_res = timeit(lambda: residual_ln(x, y, g, None, None, sh, sc, 1e-6))
    t_ln = timeit(lambda: residual_ln(x, None, None, None, None, sh, sc, 1e-6))
    print(f"residual_ln gated + modulated LN: {t_res:.1f} us; modulated LN alone: {t_ln:.1f} us; "
          f"saving x 3 per layer x 40 = {(t_res - t_ln) * 120 / 1e3:.2f} ms per forward")


if __name__ == "__main__":
    residual_vs_ln()
    main()
