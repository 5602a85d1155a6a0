"""normuon.py's Triton kernels for Newton–Schulz (``symmetric_product``, ``product_plus``), run on
CPU by Triton's interpreter, against float64 references, torch's bf16 path and torch.optim.Muon.

TRITON_INTERPRET=1 must be set before triton is imported, so the kernels run in a subprocess (this
file as a script), which prints its measurements as JSON; the tests below assert on them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import normuon
from reference import newton_schulz_float64

# Why these bounds: every entry is an fp32 sum of k exact products of bf16 numbers (error at most
# k·2^-24 times the sum of |products|, doubled for margin), then one rounding to nearest bf16 (at
# most 2^-8 relative: 8 significant bits). So each entry must lie within 2^-8 |exact| + 2k 2^-24
# |X||X|ᵀ of the float64 value; dropping beta·C or a·X, a missing tile or truncation cannot.
UNIT, FP32_UNIT = 2.0 ** -8, 2.0 ** -24


def entrywise(out, exact, magnitude, k):
    """The worst |out - exact| over its bound (<= 1: bf16 rounding of an fp32 sum), and the share
    of entries that are exactly the float64 value rounded to bf16 (nearly all, if it rounds)."""
    bound = UNIT * exact.abs() + 2 * (k + 2) * FP32_UNIT * magnitude + 1e-30
    return dict(worst=((out.double() - exact).abs() / bound).max().item(),
                rounded=(out == exact.float().bfloat16()).double().mean().item(),
                finite=bool(out.isfinite().all()), contiguous=out.is_contiguous())


def measure_symmetric(x, alpha=1.0, beta=0.0, addend=None):
    out = normuon.symmetric_product(x, alpha, beta, addend=addend)
    x64 = x.double()
    exact = alpha * x64 @ x64.mT + (beta * addend.double() if beta else 0)
    magnitude = abs(alpha) * x64.abs() @ x64.abs().mT + (abs(beta) * addend.double().abs() if beta else 0)
    return dict(entrywise(out, exact, magnitude, x.size(-1)), symmetric=torch.equal(out, out.mT),
                input_contiguous=x.is_contiguous())


def measure_product_plus(p, x, a):
    out = normuon.product_plus(p, x, a)
    exact = p.double() @ x.double() + a * x.double()
    magnitude = p.double().abs() @ x.double().abs() + abs(a) * x.double().abs()
    return dict(entrywise(out, exact, magnitude, x.size(-2)), input_contiguous=x.is_contiguous())


def errors(outputs, exact):
    """||output - exact||_F / ||exact||_F over all matrices together, for each output."""
    return {name: ((out.double() - exact).norm() / exact.norm()).item() for name, out in outputs.items()}


def measure_newton_schulz(shape, coefficients, seed):
    from torch.optim._muon import _zeropower_via_newtonschulz  # private: Muon's own NS, on 2-D
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    per_step = coefficients is normuon.POLAR_EXPRESS_COEFFICIENTS
    exact = torch.stack([newton_schulz_float64(m, coefficients, safety=1.02 if per_step else 1.0)
                         for m in matrix])
    outputs = {}
    for mode in ("triton", "torch"):
        normuon.NS_KERNELS = mode
        outputs[mode] = normuon.newton_schulz(matrix, 5, coefficients)
    if not per_step:  # torch.optim.Muon takes one (a, b, c)
        outputs["muon"] = torch.stack([_zeropower_via_newtonschulz(m, coefficients, 5, 1e-7)
                                       for m in matrix])
    return dict(errors(outputs, exact), kernel_vs_torch=errors(
        {"triton": outputs["triton"]}, outputs["torch"].double())["triton"])


LAYOUTS = {"out_in": (40, 72), "in_out": (72, 40), "conv": (24, 4, 3, 3),
           "experts_out_in": (3, 24, 40), "experts_in_out": (2, 40, 24)}


def measure_optimizer(layout, shape, seed):
    """Three NorMuon steps on one weight of ``layout`` with the kernels and with torch's path:
    the relative difference of the two updates, and how many products took the kernels."""
    decide, launched = normuon._ns_kernels, []

    def counted(x):  # the dispatch as it is, counting the products that take the kernels
        launched.append(decide(x))
        return launched[-1]
    normuon._ns_kernels = counted
    updates = {}
    for mode in ("triton", "torch"):
        normuon.NS_KERNELS = mode
        start = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        weight = torch.nn.Parameter(start.clone())
        optimizer = normuon.NorMuon([dict(params=[weight], layout=layout)], lr=0.02, compile=False)
        for step in range(3):
            weight.grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + step))
            optimizer.step()
        updates[mode] = (weight.detach() - start).double()
    normuon._ns_kernels = decide
    difference = (updates["triton"] - updates["torch"]).norm() / updates["torch"].norm()
    return dict(difference=difference.item(), kernel_products=sum(launched))


def measure():
    torch.manual_seed(0)
    normuon.NS_KERNELS = "triton"
    _, b, c = normuon.MUON_COEFFICIENTS
    gram = normuon.symmetric_product(torch.randn(3, 64, 200).bfloat16() / 10)
    nan = torch.full((2, 48, 48), float("nan")).bfloat16()
    symmetric = {
        "gram": measure_symmetric(torch.randn(2, 48, 80).bfloat16()),
        "transposed view, 4x4 tiles": measure_symmetric(torch.randn(2, 72, 100).bfloat16().mT),
        "polynomial (X = C = A)": measure_symmetric(gram, c, b, gram),
        "beta = 0, C = NaN": measure_symmetric(torch.randn(2, 48, 80).bfloat16(), 0.5, 0.0, nan),
    }
    product_plus = {
        "strided X": measure_product_plus(torch.randn(2, 48, 48).bfloat16(),
                                          torch.randn(2, 80, 48).bfloat16().mT, 3.4445),
        "strided P": measure_product_plus(torch.randn(3, 40, 40).bfloat16().mT,
                                          torch.randn(3, 40, 200).bfloat16(), -1.5),
    }
    newton_schulz = {f"{name} {shape}": measure_newton_schulz(shape, coefficients, seed)
                     for name, coefficients in (("muon", normuon.MUON_COEFFICIENTS),
                                                ("polar express", normuon.POLAR_EXPRESS_COEFFICIENTS))
                     for seed, shape in enumerate([(2, 48, 80), (3, 64, 200), (1, 150, 64)])}
    normuon.NS_KERNELS = "triton"
    zero = normuon.newton_schulz(torch.zeros(2, 16, 40))
    optimizer = {layout: measure_optimizer(layout, shape, seed)
                 for seed, (layout, shape) in enumerate(LAYOUTS.items())}
    return dict(symmetric=symmetric, product_plus=product_plus, newton_schulz=newton_schulz,
                zero=bool((zero == 0).all()), optimizer=optimizer)


def patch_interpreter_bf16():
    """Triton 3.6's interpreter and bf16, fixed to do what the GPU does (test-only): tl.dot
    multiplied bf16 bit patterns (triton-lang/triton#11584: the interpreter does not support
    bf16 dot), fp32 -> bf16 truncated (GPUs round to nearest even), and a loop bound became an
    int through int(array of shape (1,)), which NumPy >= 2.4 refuses (triton#9171)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, patch_tensor = interpreter.InterpreterBuilder, interpreter._patch_lang_tensor
    cast, dot = builder.cast_impl, builder.create_dot

    def as_float32(handle):  # bf16 is stored as uint16: its bits are fp32's upper half
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:  # torch's rounding
            bits = torch.from_numpy(src.data).bfloat16().view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    builder.cast_impl = cast_impl
    builder.create_dot = lambda self, a, b, *rest: dot(self, as_float32(a), as_float32(b), *rest)
    interpreter._patch_lang_tensor = patch_lang_tensor


# -----------------------------------------------------------------------------
# The tests: one run of the script, then assertions on what it measured


@pytest.fixture(scope="module")
def measured():
    if normuon.triton is None:
        pytest.skip("triton is not importable: normuon.py's kernels are checked under its interpreter")
    if not normuon.triton.__version__.startswith("3.6."):  # patch_interpreter_bf16 is for 3.6
        pytest.skip(f"the interpreter check is written for triton 3.6 (`pip install triton==3.6.0` "
                    f"in a CPU environment), found {normuon.triton.__version__}")
    tests = os.path.dirname(os.path.abspath(__file__))
    paths = os.pathsep.join([os.path.dirname(tests), tests])  # normuon.py, reference.py
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": paths}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


SYMMETRIC = ["gram", "transposed view, 4x4 tiles", "polynomial (X = C = A)", "beta = 0, C = NaN"]


@pytest.mark.parametrize("case", SYMMETRIC)
def test_symmetric_product_is_the_bf16_rounding_of_float64(measured, case):
    result = measured["symmetric"][case]
    assert result["finite"] and result["contiguous"]
    assert result["worst"] <= 1, result   # every entry within its bound (see UNIT)
    assert result["rounded"] > 0.9, result  # and nearly all the correctly rounded value
    assert result["symmetric"]  # the mirror tiles are the stored tiles transposed, bit for bit


def test_symmetric_product_reads_a_transposed_view(measured):
    assert not measured["symmetric"]["transposed view, 4x4 tiles"]["input_contiguous"]


@pytest.mark.parametrize("case", ["strided X", "strided P"])
def test_product_plus_is_the_bf16_rounding_of_float64(measured, case):
    result = measured["product_plus"][case]
    assert result["finite"] and result["contiguous"]
    assert result["worst"] <= 1 and result["rounded"] > 0.9, result


NEWTON_SCHULZ = [f"{name} {shape}" for name in ("muon", "polar express")
                 for shape in [(2, 48, 80), (3, 64, 200), (1, 150, 64)]]


@pytest.mark.parametrize("case", NEWTON_SCHULZ)
def test_newton_schulz_with_kernels_is_as_close_to_float64_as_torch(measured, case):
    """Five bf16 iterations land a few bf16 roundoffs (2^-8) from the float64 iteration, whichever
    bf16 products run: the kernels' error must be no more than 1.5x torch's. Most of that error is
    the input's bf16 cast, which both bf16 paths share, so they differ by less than either differs
    from float64 (measured: at most 0.55 of it)."""
    result = measured["newton_schulz"][case]
    # the torch path, as tests/test_normuon.py and test_options.py require (Polar Express: 5%)
    assert result["torch"] < (2e-2 if case.startswith("muon") else 5e-2), result
    assert result["triton"] <= 1.5 * result["torch"], result
    assert result["kernel_vs_torch"] <= result["torch"], result
    if "muon" in result:  # torch.optim.Muon's NS (addmm, one matrix at a time): the same size
        assert result["triton"] <= 1.5 * result["muon"], result


def test_newton_schulz_with_kernels_keeps_zero_at_zero(measured):
    assert measured["zero"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_normuon_with_kernels_steps_as_with_torch_products(measured, layout):
    """The optimizer's own calls (views of every layout, tall and wide, batched experts) through
    the kernels: three steps land where torch's products do, to the NS difference above (the
    update is O_t scaled per neuron, so its relative difference is that of O_t)."""
    result = measured["optimizer"][layout]
    assert result["kernel_products"] == 3 * 5 * 3, result  # 3 steps × 5 NS steps × 3 products
    assert result["difference"] < 1e-2, result


def test_cpu_tensors_take_the_torch_path():
    """The default dispatch leaves CPU tensors to torch: the iteration as before, bit for bit."""
    assert normuon.NS_KERNELS == "auto"
    matrix = torch.randn(2, 40, 24)  # tall: NS runs on the transposed view
    x = matrix.bfloat16().mT
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    a, b, c = normuon.MUON_COEFFICIENTS
    for _ in range(5):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    assert torch.equal(normuon.newton_schulz(matrix), x.mT)


if __name__ == "__main__":
    patch_interpreter_bf16()
    print(json.dumps(measure()))
