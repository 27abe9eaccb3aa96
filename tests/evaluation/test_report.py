"""The evaluation's markdown tables (results.md)."""
from meteora_moe.evaluation import markdown_table

PER_TASK = {"base": {"a": 0.0, "b": 0.5}, "meteora top-2": {"a": 1.0, "b": 0.75}}


def test_a_row_per_task_and_the_mean():
    table = markdown_table(PER_TASK, {})
    assert "| b | 0.50 | 0.75 |" in table and "| **mean** | 0.25 | 0.88 |" in table


def test_composite_rows_give_the_summed_score_per_position_and_a_dash_where_not_run():
    composite = {"base": {"3": {"summed": 0.5, "per_position": [0.5, 0.0, 0.0]}}, "meteora top-2": {}}
    table = markdown_table(PER_TASK, composite)
    assert "| base | 0.50 (0.50 / 0.00 / 0.00) |" in table and "| meteora top-2 | - |" in table


def test_no_composite_table_when_no_composite_was_evaluated():
    assert "composite" not in markdown_table(PER_TASK, {"base": {}, "meteora top-2": {}})
