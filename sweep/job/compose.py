"""Hydra's side of the config: the schemas in its ConfigStore, and one compose helper for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import secrets
import string
import textwrap
from typing import Iterable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sweep.backends.registry import BACKENDS
from sweep.config import CONF_DIR
from sweep.config.schema import (
    ATTN_IMPLEMENTATIONS,
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SweepConfig,
)
from sweep.measure.figures import FIGURES
from sweep.model.shapes import SHAPES


def register_configs() -> None:
    # ${sweep_id:} in hydra.run.dir and hydra.sweep.dir: two commands started in the same second get their own
    # output directories. Cached, like ${now:}, so every job of a sweep sees the same value.
    OmegaConf.register_new_resolver("sweep_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)
    OmegaConf.register_new_resolver("sweep_samplers", sampler_names, replace=True)  # in the help, see sampler_names
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConfig)  # types model, engine, workload, tracker and objective
    # The backend node's type depends on the backend chosen: each backend YAML pulls in its own schema.
    for name, spec in BACKENDS.items():
        cs.store(group="backend", name=f"{name}_schema", node=spec.config_class)
    cs.store(group="hydra/help", name="sweep", node={"app_name": "sweep", "template": help_text()})


# The groups `python -m sweep --help` lists, in this order, with what choosing one means.
GROUPS = {
    "model": "the checkpoint: tiny is generated locally; the others are hub ids at a pinned revision",
    "backend": "the inference engine (below)",
    "workload": "when requests arrive: latency (one client), throughput (all at t0), concurrency (N clients), "
    "rate (open loop at workload.request_rate)",
    "slo": "service-level objectives for goodput (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms)",
    "tracker": "mlflow records into ./mlruns/mlflow.db (or tracker.uri); none records nothing",
    "search": "a sweep preset (use with -m): Optuna searches (throughput, pareto, goodput, quality: quantization "
    "held to a quality bound) or max_rate, the highest request rate held under the SLO",
}


def backend_keys() -> str:
    """`compiled: scheduler (inflight)` for each backend with runtime settings: their names and defaults (as YAML
    writes them: null, true)."""
    lines = []
    for name, spec in BACKENDS.items():
        fields = [f for f in dataclasses.fields(spec.config_class) if f.name != "name"]
        if fields:
            settings = ", ".join(f"{f.name} ({OmegaConf.to_yaml({'v': f.default})[3:].strip()})" for f in fields)
            lines.append(textwrap.fill(f"{name}: {settings}", 120, initial_indent=" " * 25, subsequent_indent=" " * 27))
    return "\n".join(lines)


# What the main keys mean; `== The composed config ==` below shows their defaults. Hydra fills the help in as a
# string.Template: a literal dollar sign is written $$.
KEYS = f"""\
  device                 {", ".join(DEVICES)} (auto: CUDA when present, else the CPU)
  model.path             a local Hugging Face checkpoint directory, instead of the preset's source (records name the
                         model after the directory); model.hub_id at model.revision: a hub model
  model.dtype            the checkpoint's native dtype, a fact about the model (used when engine.dtype=auto)
  model.shape            with model.generate=random: random weights of {", ".join(SHAPES)},
                         written once under cache_dir in the run's dtype, recorded as random-<shape> (no download)
  engine.dtype           the dtype the engine runs in: {", ".join(DTYPES)}
                         (auto: model.dtype on a GPU, float32 on a CPU)
  engine.*               build options; each backend honours some and records the rest as ignored:
                         max_batch_size, max_input_len, max_seq_len, max_num_tokens, attn_implementation
                         ({", ".join(ATTN_IMPLEMENTATIONS)}), compile_mode, cuda_graphs and cuda_graph_batch_sizes
                         (compiled), gemm_plugin, gpt_attention_plugin, context_fmha, paged_kv_cache,
                         tokens_per_block (trt), tp_size and pp_size (GPUs an engine splits over)
  engine.quantization    {", ".join(QUANTIZATIONS)} (fp8: weights and activations, a GPU of
                         compute capability 8.9+); engine.kv_cache_dtype {", ".join(KV_CACHE_DTYPES)} (vllm, trt)
  quality.*              enabled, prompts (K), tokens: each run scores the engine teacher-forced against the
                         model unquantized (transformers) on the first K prompts; quality_kl, quality_top1_agreement_pct
  workload.*             num_requests, warmup_requests, iterations, input_len, output_len,
                         length_distribution (fixed, normal with input_len_std, output_len_std), batch_size,
                         dataset (JSONL in trtllm-bench's format), seed
  workload.concurrency   workload=concurrency: clients in a closed loop, each sending its next request when its
                         last one is done (more than the engine serves at once wait in its queue: a warning says so)
  workload.request_rate  workload=rate: requests offered per second, open loop (inf: every request at t0)
  workload.burstiness    workload=rate: shape of the gamma-distributed gaps between arrivals (1 = Poisson, < 1
                         burstier, > 1 steadier), seeded per iteration
  slo.*                  ttft_ms, tpot_ms, e2e_ms: a request is good when it meets every one that is set (goodput)
  objective.metric       the figure a sweep optimises (a name from the list below); objective.direction
  tracker.uri            an MLflow tracking URI (default $$MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db);
                         tracker.experiment, tracker.run_name (default: model, backend and what the sweep varies)
  cache_dir              where built engines are kept (engines_cache)
  reuse_open_engine      true: a multirun's job reuses the engine the job before left open when only the workload,
                         slo, objective, quality or tracker differ
  backend.*              the chosen backend's runtime settings (not part of the engine it builds):
{backend_keys()}"""
SAMPLER_GROUP = "hydra/sweeper/sampler"


def sampler_names() -> str:
    """The options of hydra/sweeper/sampler, read from Hydra's ConfigStore as the help is shown: the Optuna
    sweeper's plugin registers them while Hydra scans for plugins (scanning here would slow every start)."""
    try:
        return ", ".join(name.removesuffix(".yaml") for name in ConfigStore.instance().list(SAMPLER_GROUP))
    except OSError:
        return "none (the Optuna sweeper plugin is not installed)"


def sweeps_help() -> str:
    """The sweep lines of the help, with the search presets in conf/search/ and the samplers registered."""
    presets = ", ".join(sorted(p.stem for p in (CONF_DIR / "search").glob("*.yaml")))
    return f"""\
  -m key=a,b,c                  a grid over the values (Hydra's basic sweeper): one MLflow child run per point
  -m hydra/sweeper=optuna 'engine.max_batch_size=choice(1,2,4,8)' 'engine.max_num_tokens=range(256,4097,256)'
                                an Optuna search over choice(), range(), interval(); other overrides stay fixed
  -m search=throughput          a preset in conf/search/: {presets}
  {SAMPLER_GROUP}=<name>  the Optuna sampler: ${{sweep_samplers:}};
                                its settings as hydra.sweeper.sampler.<setting>=..., e.g.
                                hydra.sweeper.sampler.n_startup_trials=5 (tpe)
  hydra.sweeper.*               seed, n_trials, n_jobs, study_name, storage,
                                objectives.<figure>=maximize|minimize, constraints.<figure>='<=x' or '>=x',
                                max_failure_rate, best_config_dir
                                params.<key>='choice(...)' (the space, as a preset writes it), workers,
                                gpus_per_trial (parallel trials, each on its own GPUs), allow_repeats, confirm_top_k,
                                warm_start, budget_minutes, resume_mismatched, heartbeat_interval, grace_period
  -m search=max_rate slo=...    the highest request rate held under the SLO (hydra/sweeper=max_rate): probes
                                workload.request_rate doubling from hydra.sweeper.start_rate up to max_rate, then
                                bisects until the bracket is within tolerance; attainment (the % of requests that
                                must meet the SLO), max_probes
  hydra.launcher.*              where jobs run (hydra/launcher=slurm, ray_gpus, submitit_local): e.g. partition,
                                account, timeout_min (slurm), ray.init.address (ray_gpus)
  hydra.sweep.dir               where a multirun keeps its jobs' directories and its report"""


EXAMPLES = """\
  python -m sweep backend=compiled engine.max_batch_size=8 workload=concurrency workload.concurrency=8
      one run: 8 clients in a closed loop against the compiled engine built for batches of 8
  python -m sweep -m workload=rate workload.request_rate=1,2,4,8 workload.burstiness=0.5 slo=interactive
      a load sweep, one MLflow child run per rate: bursty arrivals, goodput and SLO attainment (TTFT <= 500 ms,
      TPOT <= 50 ms) at each offered rate, and the rate each one achieved
  python -m sweep -m search=max_rate slo=interactive backend=hf_paged hydra.sweeper.start_rate=2
      the highest rate hf_paged sustains with 99% of requests within the SLO (max_sustainable_rate_req_s on the
      sweep's parent run; each probe is a child run named `probe N: rate=R`)"""


def config_groups() -> str:
    """The groups in conf/ and their options (Hydra's own list would show the internal backend schemas too)."""
    lines = []
    for group, meaning in GROUPS.items():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group + ':':<10} {', '.join(options)}\n  {'':<10} {meaning}")
    return "\n".join(lines)


def help_text() -> str:
    """`python -m sweep --help`: groups, backends, keys, sweeps and figures from the registries, then the config."""
    backends = "\n".join(f"  {name:<10} {spec.summary}" for name, spec in BACKENDS.items())
    figures = "\n".join(
        f"  {f.name + ('_<stat>' if f.distribution else ''):<36} {f.unit or '-':<6} {f.better or '-':<7} {f.meaning}"
        for f in FIGURES
    )
    return f"""sweep: build (or reuse) an LLM inference engine, benchmark it, record it in MLflow.

  python -m sweep [group=option ...] [key=value ...]      one run
  python -m sweep -m key=a,b,c                            a grid: one MLflow child run per point
  python -m sweep -m search=throughput                    an Optuna search (conf/search/, hydra.sweeper.*)
  python -m sweep.report                                  a comparison report of the latest sweep
  python -m sweep +experiment=gpu_compare ...             a benchmark's shared settings (conf/experiment/)

== Config groups (choose one option each: group=option) ==
{config_groups()}

== Backends ==
{backends}

== Keys (key=value) ==
{KEYS}

== Sweeps (-m) ==
{sweeps_help()}

== Examples ==
{EXAMPLES}

== Figures: objective.metric, hydra.sweeper.objectives and .constraints take these names ==
Per-request figures are recorded as <name>_<stat>, stat one of p50 p90 p95 p99 mean stdev min max.
  {"name":<36} {"unit":<6} {"better":<7} meaning
{figures}

== The composed config ==
$CONFIG
$FLAGS_HELP"""


def render_help(overrides: Iterable[str] = (), resolve: bool = False) -> str:
    """`--help` with the config these overrides compose, rendered from the same template Hydra's help uses.

    Hydra's own help lists every config group first, composing the config anew for each group (about 80 times),
    and our template shows none of that list: rendering it here keeps --help as quick as one composition."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the sweeper plugins register their config groups (the samplers the help lists) as they load
    cfg = compose(overrides)
    template = help_text().replace("${sweep_samplers:}", sampler_names())
    return string.Template(template).substitute(
        FLAGS_HELP=Hydra.format_args_help(get_args_parser()), CONFIG=OmegaConf.to_yaml(cfg, resolve=resolve)
    )


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """The config `python -m sweep <overrides>` would run, composed without a command line (no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
