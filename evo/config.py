"""Run configuration: YAML validated into typed models. The defaults here are the only ones.

Unknown keys, wrong types and impossible values are rejected before anything runs, with the
key's dotted path and what is allowed. `--set a.b=value` overrides apply on top of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A configuration problem, with the key's path and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("evo-run", description="run name; the run directory is <dir>/<name>")
    dir: str = Field("runs", description="parent folder of run directories")


class DataSection(Section):
    dir: str | None = Field(None, description="prepared data directory; null: $EVO_DATA_DIR or ~/.cache/evo/data")
    seq_len: int = Field(256, gt=0, description="context length evaluate_bpb scores at (EVO_SEQ_LEN)")
    eval_tokens: int = Field(32768, gt=0, description="validation tokens scored per evaluation")


class BudgetSection(Section):
    seconds: float = Field(30.0, gt=0, description="training seconds per evaluation (EVO_TIME_BUDGET)")
    startup_grace: float = Field(60.0, ge=0, description="allowance past the budget, the same for every variant: "
                                 "compile, warm-up and export count; past seconds + startup_grace a variant is killed (over_budget)")
    eval_grace: float = Field(60.0, ge=0, description="seconds the evaluator may take to score a handed-over model")
    memory_limit_mb: float | None = Field(None, gt=0, description="kill a variant whose processes hold more (PSS, plus its private /tmp)")


class EvaluationSection(Section):
    mode: Literal["sealed", "in_process"] = Field(
        "sealed", description="sealed: the model is handed over as a graph and scored by a separate evaluator; "
                              "in_process: scored inside the variant's own process (for models torch.export cannot "
                              "capture; such scores are marked unsealed, because a variant can forge them)")
    sandbox: Literal["auto", "bubblewrap", "none"] = Field(
        "auto", description="auto: bubblewrap where it works, else run unsandboxed with a warning; bubblewrap: "
                            "required; none: never (every result records which)")
    max_model_mb: float = Field(16384, gt=0, description="a handed-over model file above this size is refused")


class PopulationSection(Section):
    size: int = Field(8, ge=1, description="members kept per island (the best by val_bpb)")
    islands: int = Field(2, ge=1, description="number of islands")
    migration_interval: int = Field(6, ge=1, description="births between ring migrations")
    migration_count: int = Field(1, ge=1, description="best members each island sends to the next")
    tournament_size: int = Field(2, ge=1, description="members drawn per tournament; the best becomes a parent")


class CascadeSection(Section):
    smoke_seconds: float = Field(0.0, ge=0, description="0: off; else a short run that must succeed before the full run")


class StoppingSection(Section):
    max_evaluations: int | None = Field(20, ge=1, description="evaluations (full runs) in total, seed included")
    max_hours: float | None = Field(None, gt=0, description="wall-clock hours of the run, resumes included")
    target_val_bpb: float | None = Field(None, gt=0, description="stop once a variant reaches this val_bpb")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.max_evaluations is None and self.max_hours is None and self.target_val_bpb is None:
            raise ValueError("set at least one of max_evaluations, max_hours, target_val_bpb, or the run never ends")
        return self


class WorkersSection(Section):
    count: int | Literal["auto"] = Field("auto", description="parallel evaluations; auto: one per GPU, else 1")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda if available, else cpu")
    gpus: list[int] | None = Field(None, description="GPU indices to use; null: all visible")
    threads_per_worker: int | None = Field(None, ge=1, description="CPU threads per variant; null: cores / workers")


class PerturbSettings(Section):
    max_changes: int = Field(2, ge=1, description="constants moved per child, at most")
    follow: float = Field(1.0, ge=0, le=1, description="chance that a winner's first perturb child takes the "
                          "winning step again (the pattern move); 0 turns it off")
    reflect: float = Field(1.0, ge=0, le=1, description="chance that a perturb child takes the opposite of a step that "
                           "made a child worse than its parent by more than the noise floor, from the same "
                           "starting value; 0 turns it off")


class CrossoverSettings(Section):
    max_taken: int = Field(3, ge=1, description="top-level definitions taken from the second parent, at most")


class OptunaSettings(Section):
    sampler: Literal["tpe", "random", "cmaes"] = Field("tpe", description="Optuna sampler")
    storage: str | None = Field(None, description="null: a journal file in the run directory; an RDB URL "
                                "(postgresql://user:pass@host/db) shared by several drivers, whose studies then learn together")
    max_changes: int = Field(3, ge=1, description="constants moved per child, at most; the rest stay at the parent's values")


class LLMSettings(Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp)")
    models: dict[str, float] = Field(default_factory=lambda: {"gpt-4.1-mini": 1.0}, description="model name -> weight")
    adapt_weights: bool = Field(True, description="scale each model's weight by its recent share of usable replies (never below 0.1 of it)")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the key (never the key)")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(4096, gt=0)
    timeout: float = Field(120.0, gt=0, description="seconds to wait for a reply; one that does not come in time is not sent again (a slow server is still generating it)")
    retries: int = Field(3, ge=0, description="retries after a failed connection, 429 and 5xx, with exponential backoff (never after a read timeout)")
    context_tokens: int | None = Field(None, gt=0, description="the model's context length in tokens; null: read from the server's /v1/models, else 8192 assumed. Prompts are trimmed and max_tokens capped to fit")
    max_outage_minutes: float = Field(30.0, gt=0, description="stop the run after the LLM server has been unreachable this long; meanwhile other operators go on and the LLM is retried with backoff")
    concurrent_requests: int = Field(2, ge=1, description="requests in flight at once across all workers")
    edit_format: Literal["diff", "full"] = Field("diff", description="SEARCH/REPLACE blocks, or a whole new file")
    token_budget: int | None = Field(None, gt=0, description="total tokens; once spent, LLM operators switch off")
    relatives: int = Field(2, ge=0, description="strong variants from other islands shown with their diffs")
    failures: int = Field(3, ge=0, description="recent failures shown with their log tails")
    ideas: int = Field(30, ge=0, description="ideas already tried, listed with their outcomes")

    @field_validator("models")
    @classmethod
    def _models(cls, value):
        if not value or any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError("give at least one model a positive weight")
        return value


class MutatorsSection(Section):
    program: str = Field("program.md", description="research direction for the LLM operators")
    perturb: PerturbSettings = PerturbSettings()
    crossover: CrossoverSettings = CrossoverSettings()
    optuna: OptunaSettings = OptunaSettings()
    llm: LLMSettings = LLMSettings()


class GuardSection(Section):
    enabled: bool = Field(True, description="false: the champion is simply the best first draw (not recommended)")
    noise_runs: int = Field(3, ge=2, description="k: re-runs of the seed on the guard's seeds that measure the noise floor")
    anchor: bool = Field(True, description="run the seed variant once more on the evaluation seed: every first "
                         "draw is set against the mean of its two draws there, steadier than one")
    reruns: int = Field(3, ge=2, description="n: re-runs of a candidate on the guard's seeds (the champion's), held-out scored")
    z: float = Field(1.0, ge=0, description="a candidate's first draw must beat the champion's standing on the "
                     "evaluation seed by more than z * sigma ...")
    min_delta: float = Field(0.002, ge=0, description="... and by at least this much val_bpb (also the minimum mean gain)")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the one-sided paired t-test (Welch's where seeds differ)")
    min_sigma: float = Field(0.001, gt=0, description="the smallest noise the guard assumes (val_bpb std): re-runs that "
                             "all give the same number (a seed that does not learn) never make a difference significant")
    alarm_window: int = Field(3, ge=2, description="champions looked at by the overfitting alarm")
    audit_runs: int = Field(1, ge=0, description="per promotion, runs of the new champion and the one before on "
                            "seeds no decision uses, reported as a check on the guard's decisions; 0: off")
    transfer_multiplier: float | None = Field(None, gt=1, description="re-run new and previous champion at this x budget; null: off")
    transfer_runs: int = Field(1, ge=1, description="runs of each at the larger budget")


class ExecutorSection(Section):
    kind: Literal["local", "ray"] = Field("local", description="local: this machine's workers (see workers:); "
                                          "ray: each evaluation a Ray task on a node of a cluster (pip install evo[ray])")
    address: str = Field("auto", description="ray: auto (the cluster `ray start` made on this machine), local (start "
                                             "a private one-machine cluster), or ray://HOST:PORT")
    gpus_per_job: float = Field(1.0, ge=0, description="ray: GPUs each evaluation holds; 0: CPU jobs")
    cpus_per_job: float = Field(1.0, gt=0, description="ray: CPU cores each evaluation holds (its torch threads)")
    jobs: int | Literal["auto"] = Field("auto", description="ray: evaluations in flight at once; auto: as many as "
                                                           "the cluster's GPUs (or CPUs) allow, re-read as nodes come and go")
    data_dir: str | None = Field(None, description="ray: the data directory on every node; null: each node's "
                                                  "$EVO_DATA_DIR or ~/.cache/evo/data, built there with the run's settings if missing")

    @field_validator("jobs")
    @classmethod
    def _jobs(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("jobs must be auto or at least 1")
        return value


class Config(Section):
    run: RunSection = RunSection()
    seed_file: str = Field("trainer/train_cpu.py", description="the seed variant; relative paths from the config's folder's parent, then the cwd")
    seed: int = Field(0, description="the engine's RNG seed (parent choice, operators) and the seed variant's "
                      "EVO_SEED, and every child's first evaluation's: comparisons are paired by seed")
    data: DataSection = DataSection()
    budget: BudgetSection = BudgetSection()
    population: PopulationSection = PopulationSection()
    operators: dict[str, float] = Field(default_factory=lambda: {"perturb": 1.0}, description="operator name -> weight")
    mutators: MutatorsSection = MutatorsSection()
    guard: GuardSection = GuardSection()
    evaluation: EvaluationSection = EvaluationSection()
    cascade: CascadeSection = CascadeSection()
    stopping: StoppingSection = StoppingSection()
    workers: WorkersSection = WorkersSection()
    executor: ExecutorSection = ExecutorSection()

    @field_validator("operators")
    @classmethod
    def _weights(cls, value: dict[str, float]):
        if not value or all(w <= 0 for w in value.values()):
            raise ValueError("give at least one operator a positive weight")
        if any(w < 0 for w in value.values()):
            raise ValueError("operator weights must be >= 0")
        from mutators.registry import OPERATORS

        unknown = sorted(set(value) - set(OPERATORS))
        if unknown:
            raise ValueError(f"unknown operator {', '.join(unknown)}; available: {', '.join(sorted(OPERATORS))}")
        return value


def _format_errors(error: ValidationError, source: str, overrides: dict[str, str] | None = None) -> str:
    """One line per problem, naming the key; a problem in a --set override is blamed on the override."""
    overrides = overrides or {}
    lines = [f"invalid configuration ({source}):"]
    for e in error.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = Config
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                parent = field.annotation if field and isinstance(field.annotation, type) else None
                if parent is None:
                    break
            problem = "unknown key" + (f"; allowed here: {', '.join(parent.model_fields)}" if parent else "")
        else:
            problem = f"{e['msg']} (got {e.get('input')!r})"
        culprit = next((a for key, a in overrides.items() if path == key or path.startswith(key + ".")), None)
        if culprit is None:
            lines.append(f"  {path}: {problem}")
        else:
            lines.append(f"  {path}: {problem}. This came from your override --set {culprit}, not the file: fix or drop it")
    return "\n".join(lines)


def apply_override(data: dict, assignment: str) -> None:
    """`budget.seconds=60` into a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: write KEY=VALUE, e.g. --set budget.seconds=60")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section, so it has no key {parts[-1]!r}. "
                              "Fix or drop that --set")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"no such config file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        # Later --set of the same key wins, as in apply_override.
        by_key = {a.partition("=")[0]: a for a in overrides}
        raise ConfigError(_format_errors(e, source, by_key)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
