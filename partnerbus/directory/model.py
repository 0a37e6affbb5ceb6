"""The directory: a networkx graph of territories, needs, partners and agreements, with the
indexes matching needs (built once, at load) and the live state partners publish.

The graph is the model that `check`, `show` and GraphML exports read; matching reads the
indexes derived from the same records, so a match is a handful of dict look-ups rather than
a graph traversal.
"""

from __future__ import annotations

import sys
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from partnerbus.schemas import Advisor, Agreement, Partner

from .errors import DirectoryError
from .needs import Need, need_chain
from .territory import FRANCE, FRANCE_ALIASES, LEVEL_RANK, Territory

BAILLEUR_SOCIAL = "bailleur-social"
CAPACITY_STATUSES = ("capacity", "no-capacity", "waitlist", "additional-assessment-required")
ANSWER_WINDOW = 20
"""How many recent answers of a partner make its acceptance rate."""
REMAINING_CAP = (1 << 19) - 1
"""Places left beyond this all rank alike (the packed sort key has 20 bits for them)."""
CAPACITY_RANK = {"capacity": 0, "additional-assessment-required": 1, "waitlist": 2}
"""Order among partners that can still take a referral; no-capacity never matches."""


@dataclass(frozen=True, slots=True)
class AgreementRule:
    """What the agreements from one organisation to another allow."""

    general: bool
    """An agreement without needs: every need may travel."""
    needs: frozenset[str]
    """Needs named by need-scoped agreements (a parent code covers its children)."""
    reason: str = ""
    scoped_reason: str = ""


class Entry:
    """One partner as matching sees it: its static facts flattened once at load, and the
    live state partners publish (capacity, answers), with the sort keys and reasons that
    follow from that state recomputed on each change rather than on each match."""

    __slots__ = (
        "accepted",
        "answers",
        "bailleur",
        "cap_rank",
        "capacity_reason",
        "full",
        "live_key",
        "open_to_all",
        "organisation",
        "partner",
        "pid",
        "rate_key",
        "rate_reason",
        "rem_key",
        "remaining",
        "status",
    )

    def __init__(self, partner: Partner) -> None:
        self.partner = partner
        self.pid = partner.id
        self.organisation = sys.intern(partner.organisation)
        self.bailleur = partner.kind == BAILLEUR_SOCIAL
        elig = partner.eligibility
        self.open_to_all = not (
            elig.age_bands
            or elig.households
            or elig.qpv_only
            or (elig.publics and "tous-publics" not in elig.publics)
        )
        self.answers: deque[bool] | None = None
        self.accepted = 0
        self.rate_key = -0.5
        self.rate_reason = "no recent answers"
        self.set_capacity(partner.capacity_status, partner.capacity)

    def set_capacity(self, status: str, remaining: int | None) -> None:
        self.status = status
        self.remaining = remaining
        self.full = status == "no-capacity" or remaining == 0
        self.cap_rank = CAPACITY_RANK.get(status, 3)
        self.rem_key = -remaining if remaining is not None else 0
        self._pack()
        if status == "capacity":
            self.capacity_reason = (
                f"capacity {remaining} left" if remaining is not None else "capacity open"
            )
        else:
            self.capacity_reason = status + (
                f" ({remaining} left)" if remaining is not None else ""
            )

    def add_answer(self, accepted: bool) -> None:
        if self.answers is None:
            self.answers = deque(maxlen=ANSWER_WINDOW)
        if len(self.answers) == ANSWER_WINDOW:
            self.accepted -= self.answers[0]
        self.answers.append(accepted)
        self.accepted += accepted
        n = len(self.answers)
        # Laplace-smoothed, so one answer does not swing a partner to 0 % or 100 %
        self.rate_key = -round((self.accepted + 1) / (n + 2), 3)
        self.rate_reason = f"accepted {self.accepted}/{n} recently"
        self._pack()

    def _pack(self) -> None:
        """The live part of the sort key as one integer (capacity rank, places left,
        acceptance rate), so a match sorts on integers instead of long tuples."""
        rate = self.rate_key
        remaining = max(self.rem_key, -REMAINING_CAP)
        rate_part = 1000 + round(rate * 1000)  # 0 (best) .. 1000
        self.live_key = (self.cap_rank << 31) | ((remaining + REMAINING_CAP) << 11) | rate_part


class Directory:
    """Who can help, where, for what, and along which agreements."""

    def __init__(
        self,
        *,
        territories: Mapping[str, Territory],
        needs: Mapping[str, Need],
        partners: Iterable[Partner],
        agreements: Iterable[Agreement] = (),
        organisations: Mapping[str, str] | None = None,
        name: str = "",
        source: str = "",
    ) -> None:
        self.name = name
        self.source = source
        self.territories: dict[str, Territory] = dict(territories)
        if FRANCE not in self.territories:
            self.territories[FRANCE] = Territory(FRANCE, "France", "france", None)
        self.needs: dict[str, Need] = dict(needs)
        self.organisations: dict[str, str] = dict(organisations or {})
        self._partners: dict[str, Partner] = {}
        for partner in partners:
            if partner.id in self._partners:
                msg = f"partner {partner.id!r} is declared twice"
                raise DirectoryError(msg)
            self._partners[partner.id] = partner
        self.agreements: tuple[Agreement, ...] = tuple(agreements)
        self._build_indexes()
        self.graph: nx.DiGraph = build_graph(self)

    # ---- indexes -------------------------------------------------------------------------

    def _build_indexes(self) -> None:
        territories = self.territories
        # Index keys and look-up keys are the very same string objects (the dict keys
        # below): a look-up then compares by identity instead of comparing characters,
        # which matters when a match touches memory that is no longer in cache.
        tcanon = {code: code for code in territories}
        ncanon = {code: code for code in self.needs}
        self._need_chain: dict[str, tuple[str, ...]] = {
            code: tuple(ncanon[c] for c in need_chain(self.needs, code)) for code in self.needs
        }
        self._need_reason: dict[str, str] = {code: f"parent need {code}" for code in self.needs}
        # every territory's chain of (code, level rank), built from its parent's chain
        chains: dict[str, tuple[tuple[str, int], ...]] = {}

        def chain_of(code: str) -> tuple[tuple[str, int], ...]:
            found = chains.get(code)
            if found is not None:
                return found
            pending: list[str] = []
            current: str | None = code
            while current is not None and current not in chains and current in territories:
                if current in pending:
                    msg = f"territory {current!r} is its own ancestor"
                    raise DirectoryError(msg)
                pending.append(tcanon[current])
                current = territories[current].parent
            tail = chains.get(current, ()) if current is not None else ()
            for item in reversed(pending):
                tail = ((item, LEVEL_RANK[territories[item].level]), *tail)
                chains[item] = tail
            return chains[code]

        self._chain: dict[str, tuple[tuple[str, int], ...]] = {}
        self._qpv_commune: dict[str, str] = {}
        for code, territory in territories.items():
            if territory.level == "commune":
                self._chain[code] = chain_of(code)
            elif territory.level == "qpv" and territory.parent is not None:
                self._qpv_commune[code] = territory.parent
        self._where: dict[str, str] = {}

        index: defaultdict[tuple[str, str], list[Entry]] = defaultdict(list)
        entries: dict[str, Entry] = {}
        agencies: defaultdict[str, list[str]] = defaultdict(list)
        needs = self.needs
        for pid in sorted(self._partners):
            partner = self._partners[pid]
            coverage = partner.coverage
            if not FRANCE_ALIASES.isdisjoint(coverage):
                coverage = tuple(FRANCE if c in FRANCE_ALIASES else c for c in coverage)
            for code in coverage:
                if code not in territories:
                    msg = f"partner {pid!r}: coverage code {code!r} is not a known territory"
                    raise DirectoryError(msg)
            entry = Entry(partner)
            entries[pid] = entry
            for need in partner.needs:
                if need not in needs:
                    msg = f"partner {pid!r}: need {need!r} is not in the taxonomy"
                    raise DirectoryError(msg)
                for code in coverage:
                    index[ncanon[need], tcanon[code]].append(entry)
            if entry.bailleur and partner.advisors:
                for code in coverage:
                    agencies[code].append(pid)
        self._index: dict[tuple[str, str], tuple[Entry, ...]] = {
            key: tuple(found) for key, found in index.items()
        }
        self._entries = entries
        self._agencies: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in agencies.items()}

        rules: defaultdict[tuple[str, str], list[Agreement]] = defaultdict(list)
        for agreement in self.agreements:
            for need in agreement.needs:
                if need not in needs:
                    msg = (
                        f"agreement {agreement.from_org} -> {agreement.to_org}: "
                        f"need {need!r} is not in the taxonomy"
                    )
                    raise DirectoryError(msg)
            rules[sys.intern(agreement.from_org), sys.intern(agreement.to_org)].append(agreement)
        self._agreements: dict[tuple[str, str], AgreementRule] = {
            (src, dst): AgreementRule(
                general=any(not a.needs for a in group),
                needs=frozenset(ncanon[n] for a in group for n in a.needs),
                reason=f"agreement {src} -> {dst}",
                scoped_reason=f"agreement {src} -> {dst} for this need",
            )
            for (src, dst), group in rules.items()
        }

    def where_reason(self, code: str) -> str:
        """'covers 59350 (commune)', cached: the first reason of a candidate."""
        found = self._where.get(code)
        if found is None:
            t = self.territories[code]
            found = (
                f"covers {code} ({t.level})"
                if t.level == "commune"
                else f"covers {code} ({t.level} {t.name})"
            )
            self._where[code] = found
        return found

    # ---- look-ups ------------------------------------------------------------------------

    def partner(self, partner_id: str) -> Partner:
        """The partner with that id; KeyError if unknown."""
        return self._partners[partner_id]

    def partners(self) -> list[Partner]:
        """Every partner, sorted by id."""
        return [self._partners[pid] for pid in sorted(self._partners)]

    def __len__(self) -> int:
        return len(self._partners)

    def __contains__(self, partner_id: object) -> bool:
        return partner_id in self._partners

    def has_commune(self, insee: str) -> bool:
        """The commune is known to the territory graph."""
        return insee in self._chain

    def has_need(self, code: str) -> bool:
        """The need code (taxonomy, parent or local) is known."""
        return code in self.needs

    def communes(self) -> list[str]:
        """Every commune code, sorted."""
        return sorted(self._chain)

    def territory(self, code: str) -> Territory:
        """The territory with that code; KeyError if unknown."""
        return self.territories[FRANCE if code in FRANCE_ALIASES else code]

    def organisation_name(self, org: str) -> str:
        return self.organisations.get(org, org)

    def agreement_rule(self, from_org: str, to_org: str) -> AgreementRule | None:
        """What may travel from one organisation to another; None: nothing."""
        return self._agreements.get((from_org, to_org))

    def agency_for(self, commune: str) -> Partner | None:
        """The landlord's agency (a `bailleur-social` partner with advisors) covering the
        commune: the most specific coverage wins, then the smallest id."""
        for code, _ in self._chain.get(commune, ()):
            ids = self._agencies.get(code)
            if ids:
                return self._partners[ids[0]]
        return None

    def advisor_for(self, agency_id: str, commune: str) -> Advisor | None:
        """The advisor of the agency who follows the commune: one naming the commune,
        else one following the whole agency (no communes), else None."""
        advisors = sorted(self._partners[agency_id].advisors, key=lambda a: a.id)
        for advisor in advisors:
            if commune in advisor.communes:
                return advisor
        for advisor in advisors:
            if not advisor.communes:
                return advisor
        return None

    # ---- live state ----------------------------------------------------------------------

    def apply_capacity(self, partner_id: str, status: str, remaining: int | None) -> None:
        """A partner published its capacity (FHIR SDOH codes); the next match sees it."""
        if status not in CAPACITY_STATUSES:
            msg = f"unknown capacity status {status!r}; expected one of {CAPACITY_STATUSES}"
            raise ValueError(msg)
        if remaining is not None and remaining < 0:
            msg = "remaining capacity cannot be negative"
            raise ValueError(msg)
        self._entries[partner_id].set_capacity(status, remaining)

    def record_answer(self, partner_id: str, accepted: bool) -> None:
        """A partner accepted or declined a referral: feeds its recent acceptance rate."""
        self._entries[partner_id].add_answer(accepted)

    def capacity(self, partner_id: str) -> tuple[str, int | None]:
        """The partner's live capacity: (status, remaining)."""
        entry = self._entries[partner_id]
        return entry.status, entry.remaining

    def acceptance(self, partner_id: str) -> tuple[int, int]:
        """(accepted, answered) over the recent window."""
        entry = self._entries[partner_id]
        return entry.accepted, len(entry.answers or ())


def build_graph(directory: Directory) -> nx.DiGraph:
    """The directory as one graph. Node keys carry a prefix (t: territory, n: need,
    p: partner, o: organisation); edges point from the specific to the general
    (`within`, `refines`), from a partner to what it covers and serves (`covers`, `serves`),
    to its organisation (`member-of`), and between organisations (`agreement`, with the
    needs it is limited to, if any)."""
    # Edge attribute dicts are shared per edge type (one dict, not 500,000): the graph is
    # a read-only view of the records, and sharing saves ~100 MB at national scale.
    within: dict[str, object] = {"type": "within"}
    refines: dict[str, object] = {"type": "refines"}
    member_of: dict[str, object] = {"type": "member-of"}
    covers: dict[str, object] = {"type": "covers"}
    serves: dict[str, object] = {"type": "serves"}
    nodes: dict[str, dict[str, object]] = {}
    edges: list[tuple[str, str, dict[str, object]]] = []
    tkey = {code: f"t:{code}" for code in directory.territories}
    for alias in FRANCE_ALIASES:
        tkey[alias] = tkey[FRANCE]
    nkey = {code: f"n:{code}" for code in directory.needs}
    for t in directory.territories.values():
        nodes[tkey[t.code]] = {"type": "territory", "level": t.level, "label": t.name}
        if t.parent is not None:
            edges.append((tkey[t.code], tkey[t.parent], within))
    for n in directory.needs.values():
        nodes[nkey[n.code]] = {"type": "need", "label": n.label, "local": n.local}
        if n.parent is not None:
            edges.append((nkey[n.code], nkey[n.parent], refines))
    orgs = {p.organisation for p in directory._partners.values()}
    orgs.update(a.from_org for a in directory.agreements)
    orgs.update(a.to_org for a in directory.agreements)
    okey = {o: f"o:{o}" for o in sorted(orgs)}
    for o, key in okey.items():
        nodes[key] = {"type": "organisation", "label": directory.organisation_name(o)}
    for p in directory._partners.values():
        key = f"p:{p.id}"
        nodes[key] = {"type": "partner", "label": p.name, "kind": p.kind}
        edges.append((key, okey[p.organisation], member_of))
        edges.extend((key, tkey[c], covers) for c in p.coverage)
        edges.extend((key, nkey[n], serves) for n in p.needs)
    agreement_needs: dict[tuple[str, str], list[str]] = {}
    for a in directory.agreements:
        agreement_needs.setdefault((a.from_org, a.to_org), []).extend(a.needs or ("*",))
    edges.extend(
        (okey[src], okey[dst], {"type": "agreement", "needs": " ".join(sorted(set(needs)))})
        for (src, dst), needs in agreement_needs.items()
    )
    return _digraph(nodes, edges, name=directory.name)


def _digraph(
    nodes: dict[str, dict[str, object]],
    edges: list[tuple[str, str, dict[str, object]]],
    name: str,
) -> nx.DiGraph:
    """A DiGraph filled through its adjacency dicts: what `add_edges_from` does, without its
    per-edge bookkeeping, which costs seconds at national scale (500,000 edges)."""
    g = nx.DiGraph(name=name)
    succ: dict[str, dict[str, dict[str, object]]] = {n: {} for n in nodes}
    pred: dict[str, dict[str, dict[str, object]]] = {n: {} for n in nodes}
    for u, v, data in edges:
        succ[u][v] = data
        pred[v][u] = data
    # networkx's own layout: _node, _adj (= _succ) and _pred, sharing each edge's dict
    g._node.update(nodes)
    g._adj.update(succ)
    g._pred.update(pred)
    return g


def directory_from_records(
    *,
    territories: Sequence[Territory],
    needs: Sequence[Need],
    partners: Sequence[Partner],
    agreements: Sequence[Agreement] = (),
    organisations: Mapping[str, str] | None = None,
    name: str = "",
) -> Directory:
    """Build a directory from plain records (handy in tests)."""
    return Directory(
        territories={t.code: t for t in territories},
        needs={n.code: n for n in needs},
        partners=partners,
        agreements=agreements,
        organisations=organisations,
        name=name,
    )
