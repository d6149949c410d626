"""``kdcl tune``: an Optuna search over any config key, each trial a ``kdcl train`` run.

The search space (``search=NAME``: ``conf/search/NAME.yaml``, read by
:mod:`kdcl.commands.search_space`) says which keys a trial draws and how. A trial composes
the run config with the command's own overrides plus its drawn values (Hydra's compose
API), trains it into ``<study dir>/trial_<n>`` like ``kdcl train`` and returns the
distilled student's best validation accuracy, which the study maximises (never test
accuracy). After every epoch of the distill stage the trial reports the best validation
accuracy so far; the pruner may stop it there (``pruned.json`` in its folder, state PRUNED).

The study lives in ``<study dir>/study.db`` (SQLite). Running the same command again
continues it up to ``tune.trials`` finished trials; the same command in several shells
shares it. A trial stopped by Ctrl-C (or SIGTERM) is failed and queued again with its
values and folder, so the next run resumes its training; a process that died without a
word stops beating (:data:`HEARTBEAT_S`) and its trial is failed and queued the same way.
Every trial shares the stage cache (``cache_dir``): the teacher and the baseline train once.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from kdcl.commands.failures import FAILED_FILE, PRUNED_FILE
from kdcl.commands.job import output_dir, plain_config
from kdcl.commands.search_space import Dimension, check_against, parse_space
from kdcl.commands.train import scenario_of, train_here
from kdcl.config.checks import composition_error, validate
from kdcl.config.options import STUDENT, stage_recipe
from kdcl.config.schema import TrainConfig, TuneConfig, TuneSettings, typed
from kdcl.errors import KdclError
from kdcl.output.tables import print_table, write_csv
from kdcl.registry import Registry
from kdcl.scenarios import REGISTERED_NAMES
from kdcl.train.engine import EpochHook
from kdcl.train.resume import Interrupted

log = logging.getLogger("kdcl")

STUDY_FILE = "study.db"
TUNE_KEYS = ("tune", "search")  # the config keys of kdcl tune itself, not of a trial's run
HEARTBEAT_S = 15  # a running trial's process writes a heartbeat this often...
GRACE_S = 60  # ...and one silent this long has died: its trial is failed and queued again
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

SAMPLERS: Registry[Callable[[int], optuna.samplers.BaseSampler]] = Registry("sampler")
PRUNERS: Registry[Callable[[TuneSettings, int], optuna.pruners.BasePruner]] = Registry("pruner")


@SAMPLERS.register("tpe")
def tpe_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """Tree-structured Parzen estimator (random for the first 10 trials); a running trial's
    values count as a poor result (``constant_liar``) so parallel processes spread out."""
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


@SAMPLERS.register("random")
def random_sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@PRUNERS.register("median")
def median_pruner(settings: TuneSettings, epochs: int) -> optuna.pruners.BasePruner:
    """Stop a trial whose best accuracy after an epoch is below the median of earlier trials' at that epoch."""
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.startup_trials, n_warmup_steps=settings.warmup_epochs + 1
    )


@PRUNERS.register("hyperband")
def hyperband_pruner(settings: TuneSettings, epochs: int) -> optuna.pruners.BasePruner:
    """Successive halving in brackets (Li et al. 2018), from the first prunable epoch to the last."""
    return optuna.pruners.HyperbandPruner(min_resource=min(settings.warmup_epochs + 1, epochs), max_resource=epochs)


@PRUNERS.register("threshold")
def threshold_pruner(settings: TuneSettings, epochs: int) -> optuna.pruners.BasePruner:
    """Stop a trial whose best accuracy after an epoch is below ``tune.prune_below``."""
    return optuna.pruners.ThresholdPruner(lower=settings.prune_below, n_warmup_steps=settings.warmup_epochs + 1)


@PRUNERS.register("none")
def no_pruning(settings: TuneSettings, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


class TrialFailed(Exception):
    """A trial's run stopped with a :class:`KdclError` (printed, and in its ``failed.txt``): the search goes on."""


def tune_command(cfg: DictConfig) -> None:
    """``kdcl tune``: check the config and the search space, open (or continue) the study, run trials."""
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        raise KdclError("kdcl tune runs its trials itself; it takes no -m", fix="drop -m")
    validate(cfg, TuneConfig, {**REGISTERED_NAMES, "tune.sampler": SAMPLERS, "tune.pruner": PRUNERS})
    plain = plain_config(cfg)
    settings = typed(TuneSettings, plain["tune"], "tune")
    run_cfg = {k: v for k, v in plain.items() if k not in TUNE_KEYS}
    if run_cfg["resume"]:
        raise KdclError(
            "kdcl tune takes no resume=: a search continues by running the same command again",
            fix="drop resume=; to finish one trial's run alone: kdcl train resume=<study dir>/trial_<n>",
        )
    if run_cfg["trainer"]["devices"] > 1:
        raise KdclError(
            f"kdcl tune trains each trial in its own process, not trainer.devices={run_cfg['trainer']['devices']}",
            fix="drop trainer.devices; to use several devices, run the same kdcl tune command once per device",
        )
    where = f"search={hc.runtime.choices.get('search')}"
    dimensions = parse_space(plain["search"], where)
    base = run_overrides(list(hc.overrides.task))
    both = sorted({d.key for d in dimensions} & {override_key(o) for o in base})
    if both:
        raise KdclError(
            f"{', '.join(both)} is searched ({where}) and set on the command line",
            fix="drop it from the command line, or from the search space",
        )
    check_against(dimensions, run_cfg, config_groups(), REGISTERED_NAMES, where)
    directory = output_dir()
    identity = {"space": plain["search"], "overrides": base}
    epochs = stage_recipe(run_cfg, STUDENT)["epochs"]  # the pruned stage is a student's
    study = open_study(settings, plain["seed"], epochs, directory, identity)
    try:
        run_trials(study, settings, dimensions, base, directory)
    except Interrupted as err:
        err.fix = "run the same command again: the search continues, and this trial resumes where it stopped"
        raise
    report_study(study, directory)


def override_key(override: str) -> str:
    """The key (or group) an override sets: ``+experiment=x`` → ``experiment``."""
    return OverridesParser.create().parse_override(override).key_or_group


def run_overrides(task: list[str]) -> list[str]:
    """The command's overrides that configure the run (all but ``tune.*`` and ``search``)."""
    return [o for o in task if override_key(o).split(".")[0] not in TUNE_KEYS]


def config_groups() -> dict[str, list[str]]:
    """The run config's groups (``distill``, ``teacher``, ...) and their options."""
    loader = GlobalHydra.instance().config_loader()
    chosen = HydraConfig.get().runtime.choices
    return {
        group: loader.get_group_options(group)
        for group in chosen
        if not group.startswith("hydra") and group not in (*TUNE_KEYS, "schema")
    }


def open_study(
    settings: TuneSettings, seed: int, epochs: int, directory: Path, identity: dict[str, Any]
) -> optuna.Study:
    """The study ``tune.study`` in ``directory/study.db``, created or continued.

    Its first run records the search (space and overrides): continuing it with another
    search is an error. The pruner counts ``epochs`` per trial. The sampler's seed is ``seed`` plus the trials the study already
    has, so that a continued (or a parallel) run does not draw the values of an earlier one again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{directory / STUDY_FILE}",
            engine_kwargs={"connect_args": {"timeout": 60}},  # wait for another process's write
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    study = optuna.create_study(storage=storage, study_name=settings.study, direction="maximize", load_if_exists=True)
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", identity)
    elif recorded != identity:
        raise KdclError(
            f"{directory / STUDY_FILE} holds study {settings.study!r} of another search "
            f"(space {recorded['space']}, overrides {recorded['overrides']})",
            fix=f"name a new study (tune.study=NAME), or continue this one with its overrides: {' '.join(recorded['overrides'])}",
        )
    return optuna.load_study(
        study_name=settings.study,
        storage=storage,
        sampler=SAMPLERS.create(settings.sampler, seed + len(study.trials)),
        pruner=PRUNERS.get(settings.pruner)(settings, epochs),
    )


def run_trials(
    study: optuna.Study, settings: TuneSettings, dimensions: list[Dimension], base: list[str], directory: Path
) -> None:
    """Run trials until the study has ``tune.trials`` finished (or running) ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # the trials of processes that died: failed, queued again
    taken = len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
    if taken >= settings.trials:
        log.info("study %s has its %d trials (%d taken): nothing to run", settings.study, settings.trials, taken)
        return
    log.info("study %s in %s: %d of %d trials taken", settings.study, directory, taken, settings.trials)
    study.optimize(
        lambda trial: run_trial(study, trial, dimensions, base, directory),
        n_trials=settings.trials - taken,
        catch=(TrialFailed,),
        callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=(*FINISHED, TrialState.RUNNING))],
        gc_after_trial=True,
    )


def run_trial(
    study: optuna.Study, trial: optuna.Trial, dimensions: list[Dimension], base: list[str], directory: Path
) -> float:
    """One trial: draw its values, compose its config, train it into its folder; its objective."""
    values = {d.key: d.draw(trial) for d in dimensions}
    run_dir = Path(trial.user_attrs.get("run_dir", directory / f"trial_{trial.number}"))  # a queued retry keeps its own
    trial.set_user_attr("run_dir", str(run_dir))
    overrides = [*base, *(f"{key}={override_value(value)}" for key, value in values.items())]
    log.info("trial %d: %s → %s", trial.number, " ".join(overrides[len(base) :]), run_dir)
    try:
        cfg = compose_trial(overrides)
        validate(cfg, TrainConfig, REGISTERED_NAMES)
        plain = plain_config(cfg)
        write_job_files(run_dir, cfg, overrides)
        with trial_log(run_dir / "train.log"):
            return train_here(plain, run_dir, pruning(trial, scenario_of(plain).objective(plain), run_dir))
    except Interrupted:
        study.enqueue_trial(trial.params, user_attrs={"run_dir": str(run_dir)})
        raise
    except KdclError as err:
        log.error("trial %d failed: %s%s", trial.number, err.what, f" (fix: {err.fix})" if err.fix else "")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).write_text(f"trial {trial.number} ({' '.join(overrides)}): {err.what}\n")
        raise TrialFailed(err.what) from None


def override_value(value: Any) -> str:
    """A drawn value as a Hydra override writes it."""
    if isinstance(value, bool) or value is None:
        return OmegaConf.to_yaml({"v": value}).strip()[3:]
    return str(value)


def compose_trial(overrides: list[str]) -> DictConfig:
    """The run config ``kdcl train OVERRIDES`` would run with (the search path of this command)."""
    try:
        return compose(config_name="config", overrides=overrides)
    except ConfigCompositionException as exc:
        err = composition_error(exc, TrainConfig)
        if err is None:
            raise
        raise err from None


def write_job_files(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """What ``kdcl train`` leaves in ``.hydra/``: the config (``kdcl train resume=DIR`` reads it)
    and the overrides (``kdcl report`` shows them as columns)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))


@contextmanager
def trial_log(path: Path) -> Iterator[None]:
    """Copy the log lines written while a trial runs into its own log file."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    shared = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    if shared is not None:
        handler.setFormatter(shared.formatter)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def pruning(trial: optuna.Trial, stage: str, run_dir: Path) -> EpochHook:
    """Report the best validation accuracy of ``stage`` so far after each of its epochs, and
    stop the trial there when the pruner says so (marking its folder with ``pruned.json``)."""
    best = 0.0

    def on_epoch(name: str, row: dict[str, Any]) -> None:
        nonlocal best
        if name != stage:
            return
        best = max(best, row["val_acc"])
        trial.report(best, row["epoch"])
        if trial.should_prune():
            record = {"trial": trial.number, "stage": stage, "epoch": row["epoch"], "best_val_acc": best}
            (run_dir / PRUNED_FILE).write_text(json.dumps(record, indent=2) + "\n")
            raise optuna.TrialPruned(f"{stage} epoch {row['epoch']}: best val_acc {best:.4f}")

    return on_epoch


def report_study(study: optuna.Study, directory: Path) -> None:
    """Write ``trials.csv`` (one row per trial: state, objective, values, folder), print it and the best trial."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    frame = frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    frame["duration"] = frame["duration"].dt.total_seconds().round(1)
    frame = frame.rename(columns={"value": "best_val_acc", "duration": "seconds"})
    write_csv(frame, directory / "trials.csv")
    print_table(frame, f"kdcl tune — {study.study_name}: {len(frame)} trials")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if done:
        best = study.best_trial
        log.info(
            "best trial %d: best_val_acc %.4f with %s (%s)",
            best.number,
            best.value,
            " ".join(f"{k}={v}" for k, v in best.params.items()),
            best.user_attrs.get("run_dir"),
        )
    log.info("wrote %s; all trials: kdcl report %s", directory / "trials.csv", directory)
