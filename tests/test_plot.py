"""`fcb plot` (and `fcb replay`) on every adapter's run and on history files; what the
figure shows, read from its matplotlib objects."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import fcb
from fcb import cli
from fcb.cli import _plot

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import fcb.torch  # noqa: E402

# falls on a line to step 25, then flat: the decisions are on the plateau, and the falling
# line crosses the top right quarter of the axes, where a zoom would go
PLATEAU = [1.0 - 0.028 * s for s in range(26)] + [0.299, 0.301, 0.2985, 0.3005, 0.302,
                                                  0.303, 0.304, 0.305]


def _torch_run(directory, val_loss, callbacks, train_loss=None):
    """A real TorchAdapter run with history=True, fed scripted metrics."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = fcb.torch.TorchAdapter(
        callbacks, model=model, optimizer=optimizer, dirpath=str(directory), history=True
    )
    adapter.on_fit_start()
    for step, value in enumerate(val_loss):
        metrics = {"val_loss": value}
        if train_loss is not None:
            metrics["train_loss"] = train_loss[step]
        adapter.on_validation_end(metrics, step=step)
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return directory


@pytest.fixture
def figures(monkeypatch):
    """Every figure `fcb plot` saves, kept for inspection."""
    saved = []

    def keep(fig, path):
        saved.append(fig)

    monkeypatch.setattr(_plot, "_save", keep)
    return saved


def _plot_of(capsys, figures, *argv):
    code = cli.main(["plot", *argv])
    _, err = capsys.readouterr()
    assert code == 0, err
    figure = figures[-1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()  # laid out as saved (a closed figure's canvas draws nothing)
    return figure


def _star(axes):
    stars = [line for line in axes.lines if line.get_marker() == "*"]
    assert len(stars) == 1, [line.get_label() for line in axes.lines]
    return stars[0]


def _vertical_lines(axes):
    return [
        line for line in axes.lines
        if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
        and line.get_linestyle() in (":", "--")
    ]


def test_the_zoom_covers_neither_the_curve_nor_the_star(tmp_path, capsys, figures):
    run = _torch_run(tmp_path / "run", PLATEAU, fcb.chain(
        fcb.EarlyStopping("val_loss", patience=6),
        fcb.ModelCheckpoint("val_loss"),
        fcb.BestCheckpoint("val_loss", tolerances=(2,)),
    ))
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"))
    ax = figure.axes[0]
    (zoom,) = ax.child_axes
    box = zoom.get_window_extent()
    curve = ax.lines[0]
    steps, values = (np.asarray(a, float) for a in curve.get_data())
    # the curve and its segments, densely: no point of it lies under the zoom
    dense_x = np.linspace(steps[0], steps[-1], 2000)
    dense = ax.transData.transform(np.column_stack([dense_x, np.interp(dense_x, steps, values)]))
    assert not any(box.contains(x, y) for x, y in dense)
    star = ax.transData.transform(np.column_stack(_star(ax).get_data()))[0]
    assert not box.contains(*star)
    for marker in ax.lines:
        if marker.get_marker() == "^":
            at = marker.get_transform().transform(np.column_stack(marker.get_data()))[0]
            assert not box.contains(*at)


def test_markers_at_one_check_stay_visible(tmp_path, capsys, figures):
    # the best check is kept by both tolerances: a star and two triangles at one step
    run = _torch_run(tmp_path / "run", [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], fcb.chain(
        fcb.EarlyStopping("val_loss", patience=5),
        fcb.ModelCheckpoint("val_loss"),
        fcb.BestCheckpoint("val_loss", tolerances=(2, 3)),
    ))
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"))
    ax = figure.axes[0]
    points = figure.dpi / 72

    def centre(line):
        return line.get_transform().transform(np.column_stack(line.get_data()))[0]

    star = centre(_star(ax))
    triangles = [centre(line) for line in ax.lines if line.get_marker() == "^"]
    assert len(triangles) == 2
    # star radius 10 points, triangle radius 5.5: no marker overlaps another
    for triangle in triangles:
        assert star[1] - triangle[1] >= 15 * points - 0.5, (star, triangle)
    assert abs(triangles[0][1] - triangles[1][1]) >= 11 * points - 0.5, triangles
    low, _ = ax.get_ylim()
    assert min(t[1] for t in triangles) > ax.transData.transform((0, low))[1]  # inside


def test_step_axes_have_integer_ticks(tmp_path, capsys, figures):
    run = _torch_run(tmp_path / "run", [0.9, 0.6, 0.5, 0.55], fcb.ModelCheckpoint("val_loss"))
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"))
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_with_another_metric_the_star_is_its_best_and_the_monitored_best_is_named(
    tmp_path, capsys, figures
):
    val = [1.0, 0.6, 0.5, 0.52, 0.55, 0.6]
    train = [1.0, 0.7, 0.5, 0.4, 0.35, 0.3]  # still falling: its best is the last check
    run = _torch_run(tmp_path / "run", val, fcb.chain(
        fcb.EarlyStopping("val_loss", patience=10), fcb.ModelCheckpoint("val_loss"),
    ), train_loss=train)
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"),
                      "--metric", "train_loss")
    ax = figure.axes[0]
    star = _star(ax)
    assert star.get_xdata()[0] == 5 and star.get_ydata()[0] == pytest.approx(0.3)
    assert "train_loss" in star.get_label()
    labels = [line.get_label() for line in ax.lines]
    assert any("val_loss" in label and "step 2" in label for label in labels), labels


def test_stop_lines_at_the_same_step_stay_visible(tmp_path, capsys, figures):
    # EarlyStopping(patience=3) and the tolerance 3 of BestCheckpoint stop at the same check
    run = _torch_run(tmp_path / "run", [1.0, 0.5, 0.6, 0.7, 0.8, 0.9], fcb.chain(
        fcb.EarlyStopping("val_loss", patience=3),
        fcb.ModelCheckpoint("val_loss"),
        fcb.BestCheckpoint("val_loss", tolerances=(3,)),
    ))
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"))
    ax = figure.axes[0]
    xs = sorted(line.get_xdata()[0] for line in _vertical_lines(ax))
    assert len(xs) == 2
    assert xs[0] != xs[1] and all(abs(x - 4) < 0.5 for x in xs)  # both near the stop, apart
    labels = [line.get_label() for line in _vertical_lines(ax)]
    assert any("the same check as the real stop" in label for label in labels), labels


def test_plot_of_a_history_file(tmp_path, capsys, figures):
    run = _torch_run(tmp_path / "run", [1.0, 0.5, 0.6, 0.4], fcb.ModelCheckpoint("val_loss"))
    figure = _plot_of(capsys, figures, str(run / "history.jsonl"), "-o", str(tmp_path / "p.png"))
    assert _star(figure.axes[0]).get_xdata()[0] == 3


def test_plot_of_a_lightning_metrics_csv(tmp_path, capsys, figures):
    # CSVLogger's layout: training rows and validation rows, the other columns empty
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train_loss,val_loss\n"
        "0,3,0.9,\n0,3,,0.8\n1,7,0.7,\n1,7,,0.6\n2,11,0.6,\n2,11,,0.65\n"
    )
    figure = _plot_of(capsys, figures, str(path), "-o", str(tmp_path / "p.png"),
                      "--steps", "epoch")
    ax = figure.axes[0]
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.8, 0.6, 0.65])
    assert _star(ax).get_xdata()[0] == 1
    figure = _plot_of(capsys, figures, str(path), "-o", str(tmp_path / "p.png"))
    assert list(figure.axes[0].lines[0].get_xdata()) == [3, 7, 11]  # the step column


# -- every adapter: fcb plot RUN and fcb replay RUN ------------------------------------------


def _orbax_run(directory):
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("orbax.checkpoint")
    import fcb.orbax

    adapter = fcb.orbax.OrbaxAdapter(
        fcb.chain(fcb.EarlyStopping("val_loss", patience=2), fcb.ModelCheckpoint("val_loss")),
        str(directory), history=True, background=False,
    )
    adapter.on_fit_start()
    for step, loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.8]):
        adapter.on_validation_end({"val_loss": loss}, step=step, state={"w": jnp.zeros(2)})
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return directory


def _lightning_run(root):
    pl = pytest.importorskip("pytorch_lightning")
    from test_lightning import Regression, loaders  # the small real Trainer of those tests

    import fcb.lightning

    pl.seed_everything(0, verbose=False)
    callback = fcb.lightning.FcbCallback(
        fcb.chain(fcb.EarlyStopping("val_loss", patience=2), fcb.ModelCheckpoint("val_loss")),
        history=True,
    )
    trainer = pl.Trainer(
        default_root_dir=str(root), max_epochs=4, callbacks=[callback],
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(), *loaders())
    return root


@pytest.mark.parametrize("make_run", [_orbax_run, _lightning_run], ids=["orbax", "lightning"])
def test_plot_and_replay_of_every_adapters_run(make_run, tmp_path, capsys, figures):
    run = make_run(tmp_path / "run")
    figure = _plot_of(capsys, figures, str(run), "-o", str(tmp_path / "p.png"))
    steps = list(figure.axes[0].lines[0].get_xdata())
    assert steps == list(range(len(steps))) and len(steps) >= 2
    code = cli.main(["replay", str(run), "--monitor", "val_loss", "--patience", "1:2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0] == f"replay: 2 configurations x {len(steps)} checks; " \
        "best = lowest val_loss"
    records = [json.loads(line) for line in (next(run.rglob("history.jsonl"))).read_text()
               .splitlines()]
    assert [r["step"] for r in records if "metrics" in r] == steps
