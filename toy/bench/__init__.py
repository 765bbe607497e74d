"""The toy benchmark suite: W2SD against plain strong sampling and autoguidance at equal NFE."""

from .cases import BenchCase, analytic_cases
from .methods import Method, Plan, budget, method_set, plan
from .stats import PairedInterval, paired_interval
from .suite import BenchConfig, CaseResult, bench_schedule, run_case_bench, run_suite
