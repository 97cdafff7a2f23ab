import matplotlib.image
import numpy as np
import pytest

from lorpa.harness.plots import heatmap_panel, kept_mass, module_thresholds, plot_prune_report, prune_figure, rank_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def prune_report(new_ranks: dict[str, int], old_rank=16, scope="module"):
    """A report shaped like PruneReport.to_dict(): scores spanning five decades, one zero per module,
    and the top `new_rank` components kept."""
    modules = {}
    for offset, (name, new_rank) in enumerate(new_ranks.items()):
        scores = [0.0] + [10 ** (-5 + 5 * i / old_rank) * (1 + offset / 10) for i in range(1, old_rank)]
        kept = sorted(range(old_rank), key=lambda i: -scores[i])[:new_rank]
        modules[name] = {"old_rank": old_rank, "new_rank": new_rank, "old_alpha": 2 * old_rank,
                         "new_alpha": 2 * new_rank, "kept": sorted(kept), "scores": scores}
    return {"score": "magnitude", "scope": scope, "rewind": "none", "modules": modules}


ROBERTA = {
    f"base_model.model.roberta.encoder.layer.{layer}.attention.self.{kind}": 1 + 2 * layer + (kind == "value")
    for layer in range(3) for kind in ("query", "value")
}

BART = {
    f"base_model.model.model.{stack}.layers.{layer}.{kind}": 1 + 6 * layer + index
    for layer in range(2)
    for index, (stack, kind) in enumerate([
        ("encoder", "self_attn.q_proj"), ("encoder", "self_attn.v_proj"),
        ("decoder", "self_attn.q_proj"), ("decoder", "self_attn.v_proj"),
        ("decoder", "encoder_attn.q_proj"), ("decoder", "encoder_attn.v_proj"),
    ])
}


def test_roberta_ranks_land_in_their_layer_and_kind():
    grid = rank_grid(prune_report(ROBERTA))
    assert grid.rows == ["0", "1", "2"]
    assert grid.columns == ["query", "value"]
    for layer in range(3):
        assert grid.new_rank[layer, 0] == 1 + 2 * layer
        assert grid.new_rank[layer, 1] == 2 + 2 * layer
    assert np.all(grid.old_rank == 16)


def test_bart_separates_encoder_decoder_and_cross_attention():
    grid = rank_grid(prune_report(BART))
    assert grid.rows == ["0", "1"]
    assert grid.columns == ["enc q_proj", "enc v_proj", "dec q_proj", "dec v_proj", "cross q_proj", "cross v_proj"]
    assert grid.new_rank.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]


def test_same_last_name_part_gets_distinct_columns_and_gaps_stay_empty():
    names = {
        "roberta.encoder.layer.0.attention.output.dense": 3,
        "roberta.encoder.layer.0.output.dense": 4,
        "roberta.encoder.layer.1.intermediate.dense": 5,
    }
    grid = rank_grid(prune_report(names))
    assert grid.columns == ["attention.output.dense", "output.dense", "intermediate.dense"]
    assert grid.new_rank[0, :2].tolist() == [3, 4] and grid.new_rank[1, 2] == 5
    assert np.isnan(grid.new_rank[0, 2]) and np.isnan(grid.new_rank[1, 0])


def test_names_without_layer_index_get_one_row_each():
    grid = rank_grid(prune_report({"pooler.dense": 2, "classifier.dense": 5}))
    assert grid.rows == ["pooler.dense", "classifier.dense"]
    assert grid.columns == ["module"]
    assert grid.new_rank[:, 0].tolist() == [2, 5]


def test_threshold_is_the_highest_pruned_score_per_module():
    report = prune_report({"a.layer.0.q": 4, "a.layer.0.v": 16})
    scores = report["modules"]["a.layer.0.q"]["scores"]
    assert module_thresholds(report) == {"a.layer.0.q": sorted(scores)[-5]}


@pytest.mark.parametrize(("names", "scope"), [(ROBERTA, "global"), (BART, "module")])
def test_plot_is_a_readable_png(tmp_path, names, scope):
    path = plot_prune_report(prune_report(names, scope=scope), tmp_path / "rank_plot.png")
    assert path == tmp_path / "rank_plot.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_report_without_modules_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no modules"):
        empty = {"score": "magnitude", "scope": "module", "rewind": "none", "modules": {}}
        plot_prune_report(empty, tmp_path / "x.png")


def test_module_scope_map_shows_the_score_mass_kept_not_one_colour():
    report = prune_report(dict.fromkeys(ROBERTA, 4))
    flat = report["modules"]["base_model.model.roberta.encoder.layer.0.attention.self.query"]
    flat["scores"] = [1.0] * 16  # four equal components of sixteen: 25% of the mass
    values, _, title, _ = heatmap_panel(rank_grid(report))
    module = report["modules"]["base_model.model.roberta.encoder.layer.1.attention.self.value"]
    top4 = sorted(module["scores"])[-4:]
    assert kept_mass(module) == pytest.approx(sum(top4) / sum(module["scores"]))
    assert values[1, 1] == pytest.approx(100 * kept_mass(module))
    assert values[0, 0] == pytest.approx(25.0)
    assert "score mass kept" in title and "rank 4" in title


def test_global_scope_map_shows_the_surviving_ranks():
    values, _, title, _ = heatmap_panel(rank_grid(prune_report(ROBERTA, scope="global")))
    assert values[2, 1] == ROBERTA["base_model.model.roberta.encoder.layer.2.attention.self.value"]
    assert title == "(a) surviving rank per module"


def test_histogram_says_it_is_stacked_and_labels_its_log_axis():
    figure = prune_figure(prune_report(dict.fromkeys(ROBERTA, 4)))
    scores_axis = figure.axes[1]
    assert "stacked" in scores_axis.get_title()
    figure.canvas.draw()
    labels = [label.get_text() for label in scores_axis.get_xticklabels() if label.get_text()]
    assert len(labels) >= 5


def test_relative_errors_get_their_own_panel_in_their_module_cells():
    report = prune_report(ROBERTA)
    errors = {name: 0.1 * (i + 1) for i, name in enumerate(report["modules"])}
    for name, module in report["modules"].items():
        module["relative_error"] = errors[name]
    grid = rank_grid(report)
    layer2_value = "base_model.model.roberta.encoder.layer.2.attention.self.value"
    assert grid.relative_error[2, grid.columns.index("value")] == pytest.approx(errors[layer2_value])
    assert [ax.get_title() for ax in prune_figure(report).axes if ax.get_title()][-1].startswith("(c) update lost")
    assert len([ax for ax in prune_figure(prune_report(ROBERTA)).axes if ax.get_title().startswith("(c)")]) == 0
