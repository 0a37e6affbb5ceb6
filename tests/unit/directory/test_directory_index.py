"""The directory's public match index: what `match` reads, its shape and its upkeep."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import partnerbus.directory
from partnerbus.directory.model import MatchIndex

from .conftest import (
    ARREARS,
    HOUSING,
    LILLE,
    MEL,
    NORD,
    QPV_ROUBAIX,
    ROUBAIX,
    make_directory,
    partner,
)

DIRECTORY_PACKAGE = Path(partnerbus.directory.__file__).parent


def test_the_index_describes_chains_needs_and_entries_as_documented() -> None:
    """Each field of `MatchIndex` holds what its docstring says, for a small directory."""
    d = make_directory(
        [partner("pa"), partner("pb", coverage=(MEL,)), partner("pq", coverage=(QPV_ROUBAIX,))]
    )
    index = d.index
    assert isinstance(index, MatchIndex)
    assert [code for code, _ in index.territory_chains[LILLE]] == [
        LILLE,
        MEL,
        NORD,
        "R32",
        "france",
    ]
    ranks = [rank for _, rank in index.territory_chains[LILLE]]
    assert ranks == sorted(ranks)
    assert index.need_chains[ARREARS] == (ARREARS, HOUSING)
    assert index.need_sets[ARREARS] == frozenset({ARREARS, HOUSING})
    assert index.qpv_commune[QPV_ROUBAIX] == ROUBAIX
    # only covered territories have a level; a commune's match chain is its levels in order
    assert set(index.levels) == {LILLE, MEL, QPV_ROUBAIX}
    assert index.match_chains[LILLE] == (index.levels[LILLE], index.levels[MEL])
    assert index.match_chains[ROUBAIX] == (index.levels[MEL],)  # QPVs are added per person
    base, where, at = index.levels[LILLE]
    assert where == f"covers {LILLE} (commune)"
    assert [e.partner.id for e in at[ARREARS]] == ["pa"]
    assert index.need_steps[ARREARS] == (
        (0, ARREARS, "exact need"),
        (4, HOUSING, f"parent need {HOUSING}"),
    )
    assert set(index.entries) == {"pa", "pb", "pq"}
    # score_heads[level base + need base + eligibility × 2 + agreement] decodes those parts
    assert index.score_heads[base + 4 + 2 + 1] == (base // 32, 1, 1, 1)
    assert index.chains_ordered


def test_the_index_is_one_read_only_object_kept_current_by_live_state() -> None:
    """`Directory.index` is the same frozen object before and after live-state changes,
    and its entry tuples follow capacity and answers at once."""
    d = make_directory([partner("pa"), partner("pb")])
    index = d.index
    at = index.levels[LILLE][2]
    assert [e.partner.id for e in at[ARREARS]] == ["pa", "pb"]
    d.apply_capacity("pb", "capacity", 9)
    assert d.index is index
    assert [e.partner.id for e in at[ARREARS]] == ["pb", "pa"]
    assert index.entries["pb"].capacity_reason == "capacity 9 left"
    d.apply_capacity("pb", "capacity", None)
    d.record_answer("pa", accepted=True)
    assert d.index is index
    assert [e.partner.id for e in at[ARREARS]] == ["pa", "pb"]
    assert index.entries["pa"].rate_reason == "accepted 1/1 recently"
    with pytest.raises(dataclasses.FrozenInstanceError):
        index.chains_ordered = False  # type: ignore[misc]


@pytest.mark.parametrize("module", ["match.py", "check.py", "render.py"])
def test_directory_readers_use_no_private_attribute_of_the_model(module: str) -> None:
    """`match`, `check` and `render` read the directory through its public surface only."""
    tree = ast.parse((DIRECTORY_PACKAGE / module).read_text(encoding="utf-8"))
    private = sorted(
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in {"d", "directory", "index"}
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    )
    assert private == []
