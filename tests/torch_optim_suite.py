"""torch's own generic optimizer tests (TestOptimRenewed in pytorch's test/test_optim.py) for
normuon.NorMuon next to torch.optim.Muon: pass/fail counts side by side, and each failure's cause.

Not part of CI: it needs torch's test source, which this repository does not include. To run it:

    pip install expecttest hypothesis
    # torch's test/test_optim.py, best from the commit of the installed torch, which
    #   python -c "import torch; print(torch.__version__, torch.version.git_version)"
    # prints: https://github.com/pytorch/pytorch/blob/<commit>/test/test_optim.py
    python tests/torch_optim_suite.py /tmp/test_optim.py       # -v: every test; -k WORD: filter

How it runs them. NorMuon gets an OptimizerInfo modelled on torch's optim_db entry for Muon: the
same inputs (torch's optim_inputs_func_muon: default, lr, Tensor lr, weight_decay, momentum,
ns_steps, ns_coefficients), the same flags (no foreach/fused/differentiable, no complex) and the
same skips and decorators; its error inputs are torch's common ones plus NorMuon's own messages for
what torch checks for Muon (a 1-D or 3-D parameter, an unknown adjust_lr_fn, a complex parameter).
optim_db is narrowed to these two entries before test_optim.py is executed. torch's tests give Muon
only 2-D parameters by testing ``optim_cls.__name__ == "Muon"``; NorMuon has the same contract
(weight matrices only), so those name tests are widened to ("Muon", "NorMuon"), and the number of
rewrites is printed. test_optim.py's imports of its sibling modules (optim.test_lrscheduler, ...)
get empty stubs: only TestOptimRenewed runs. "Apply" means: instantiated for Muon on this device
and not skipped there.
"""

import argparse
import collections
import sys
import types
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("Muon", "NorMuon")


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("test_optim", type=Path, help="path to torch's test/test_optim.py")
    parser.add_argument("-k", default="", help="run only tests whose name contains this")
    parser.add_argument("-v", action="store_true", help="print every test's outcome")
    return parser.parse_args()


def stub_sibling_test_modules():
    """test_optim.py imports TestLRScheduler etc. from test/optim/; TestOptimRenewed needs none."""
    sys.modules["optim"] = types.ModuleType("optim")
    for module, names in {
        "test_lrscheduler": ["TestLRScheduler"],
        "test_optim": ["TestDifferentiableOptimizer"],
        "test_swa_utils": ["TestSWAUtils"],
    }.items():
        stub = types.ModuleType(f"optim.{module}")
        for name in names:
            setattr(stub, name, type(name, (), {}))
        sys.modules[f"optim.{module}"] = stub


def normuon_error_inputs(device, dtype):
    """torch's error inputs for all optimizers and NorMuon's for what torch checks for Muon."""
    import torch
    from torch.testing._internal import common_optimizers as co

    def parameter(*shape, dtype=dtype):
        tensor = torch.rand(*shape, device=device, dtype=dtype)
        tensor.grad = torch.rand_like(tensor)
        return tensor

    def construction_error(params, kwargs, desc, regex):
        return co.ErrorOptimizerInput(
            co.OptimizerInput(params=params, kwargs=kwargs, desc=desc),
            error_type=ValueError,
            error_regex=regex,
            error_on=co.OptimizerErrorEnum.CONSTRUCTION_ERROR,
        )

    return co.get_error_inputs_for_all_optims(device, dtype) + [
        construction_error(
            [parameter(4)], {}, "a 1-D parameter", r"trains weight matrices \(>= 2-D\)"
        ),
        construction_error(
            [parameter(2, 3, 4)], {}, "a 3-D parameter without a layout", "3-D parameter"
        ),
        construction_error(
            [parameter(2, 3)],
            {"adjust_lr_fn": "arbitrary"},
            "unknown adjust_lr_fn",
            "adjust_lr_fn must be one of",
        ),
        construction_error(
            [parameter(2, 3, dtype=torch.complex64)],
            {},
            "a complex parameter",
            "does not support complex parameters",
        ),
    ]


def narrow_optim_db():
    """optim_db becomes [Muon's entry, NorMuon's entry modelled on it]."""
    sys.path.insert(0, str(REPO))
    import normuon
    from torch.testing._internal import common_optimizers as co

    muon = next(info for info in co.optim_db if info.name == "Muon")
    entry = co.OptimizerInfo(
        normuon.NorMuon,
        optim_inputs_func=muon.optim_inputs_func,
        optim_error_inputs_func=normuon_error_inputs,
        scheduler_inputs=muon.scheduler_inputs,
        supported_impls=muon.supported_impls,
        not_og_supported_flags=muon.not_og_supported_flags,
        supports_complex=muon.supports_complex,
        supports_sparse=muon.supports_sparse,
        only_supports_sparse_grads=muon.only_supports_sparse_grads,
        step_requires_closure=muon.step_requires_closure,
        supports_param_groups=muon.supports_param_groups,
        supports_multiple_devices=muon.supports_multiple_devices,
        supports_fused_on=muon.supports_fused_on,
        has_capturable_arg=muon.has_capturable_arg,
        decorators=list(muon.decorators),
    )
    co.optim_db[:] = [muon, entry]


def load_test_module(path: Path):
    """Execute test_optim.py (patched as the module docstring says) and return its namespace."""
    source = path.read_text()
    rewrites = source.count('__name__ == "Muon"') + source.count('__name__ != "Muon"')
    source = source.replace('__name__ == "Muon"', "__name__ in MUON_LIKE").replace(
        '__name__ != "Muon"', "__name__ not in MUON_LIKE"
    )
    module = types.ModuleType("test_optim")
    module.__file__ = str(path)
    module.MUON_LIKE = NAMES
    sys.modules["test_optim"] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module, rewrites


class Outcomes(unittest.TestResult):
    """Each test's outcome: pass, fail (with the exception's last line) or skip."""

    def __init__(self):
        super().__init__()
        self.outcomes = {}

    def addSuccess(self, test):
        self.outcomes[test.id()] = ("pass", "")

    def _failure(self, test, error):
        kind, value, _ = error
        message = (str(value).strip().splitlines() or [""])[0][:160]
        self.outcomes[test.id()] = ("FAIL", f"{kind.__name__}: {message}")

    addFailure = addError = _failure

    def addSkip(self, test, reason):
        self.outcomes[test.id()] = ("skip", reason)

    def addExpectedFailure(self, test, error):
        self.outcomes[test.id()] = ("xfail", "")

    def addUnexpectedSuccess(self, test):
        self.outcomes[test.id()] = ("FAIL", "unexpected success")


def split_name(test_id: str):
    """'...test_errors_NorMuon_cpu_float32' -> ('test_errors[cpu_float32]', 'NorMuon')."""
    method = test_id.rsplit(".", 1)[-1]
    for name in sorted(NAMES, key=len, reverse=True):
        marker = f"_{name}_"
        if marker in method:
            head, tail = method.split(marker, 1)
            return f"{head}[{tail}]", name
    return None, None


def main():
    arguments = parse_arguments()
    sys.argv = sys.argv[:1]  # torch's test utilities read sys.argv
    stub_sibling_test_modules()
    narrow_optim_db()
    module, rewrites = load_test_module(arguments.test_optim)
    print(f"{arguments.test_optim}: {rewrites} Muon-only name tests widened to {NAMES}")

    suite = unittest.TestSuite()
    device_classes = [
        value
        for key, value in vars(module).items()  # TestOptimRenewedCPU, ...
        if key.startswith("TestOptimRenewed") and key != "TestOptimRenewed"
    ]
    for test_case in device_classes:
        for test in unittest.defaultTestLoader.loadTestsFromTestCase(test_case):
            if split_name(test.id())[0] and arguments.k in test.id():
                suite.addTest(test)
    result = Outcomes()
    suite.run(result)

    table = collections.defaultdict(dict)  # test -> {"Muon": outcome, "NorMuon": outcome}
    for test_id, outcome in result.outcomes.items():
        test, name = split_name(test_id)
        table[test][name] = outcome
    return report(table, arguments.v)


def status(table, test, name):
    return table[test].get(name, ("missing", ""))[0]


def report(table, verbose: bool) -> int:
    """Print the counts (and with ``verbose`` every test); 0 if NorMuon passes all that apply."""
    tests = sorted(table)
    applies = [test for test in tests if status(table, test, "Muon") != "skip"]
    if verbose:
        width = max(map(len, tests), default=10)
        print(f"{'test':<{width}}  {'Muon':<6} NorMuon")
        for test in tests:
            muon, ours = status(table, test, "Muon"), status(table, test, "NorMuon")
            print(f"{test:<{width}}  {muon:<6} {ours}")
    print(
        f"\nInstantiated for torch.optim.Muon: {len(tests)}; skipped for it on this device: "
        f"{len(tests) - len(applies)}; the {len(applies)} that apply:"
    )
    passes = {name: sum(status(table, test, name) == "pass" for test in applies) for name in NAMES}
    for name in NAMES:
        print(f"  {name:<8} passes {passes[name]}/{len(applies)}")
    for test in tests:
        for name in NAMES:
            outcome, detail = table[test].get(name, ("missing", ""))
            if outcome != "pass" and (test in applies or outcome != "skip"):
                print(f"  {name} {outcome}: {test}: {detail}")
    return 0 if passes["NorMuon"] == len(applies) else 1


if __name__ == "__main__":
    sys.exit(main())
