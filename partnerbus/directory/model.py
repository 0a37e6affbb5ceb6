"""The directory: a networkx graph of territories, needs, partners and agreements, with the
indexes matching needs (built once, at load) and the live state partners publish.

The graph is the model that `check`, `show` and GraphML exports read; matching reads the
indexes derived from the same records, so a match is a handful of dict look-ups rather than
a graph traversal.
"""

from __future__ import annotations

import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter

import networkx as nx

from partnerbus.directory.errors import DirectoryError
from partnerbus.directory.kinds import LOCAL_KINDS
from partnerbus.directory.needs import Need, need_chain
from partnerbus.directory.rights import is_pivot
from partnerbus.directory.territory import (
    FRANCE,
    FRANCE_ALIASES,
    LEVEL_RANK,
    Territory,
    ancestors,
    own_departement,
)
from partnerbus.schemas import Advisor, Agreement, Partner
from partnerbus.schemas.directory import HOME_VISIT

BAILLEUR_SOCIAL = "bailleur-social"
CAPACITY_STATUSES = ("capacity", "no-capacity", "waitlist", "additional-assessment-required")
ANSWER_WINDOW = 20
"""How many recent answers of a partner make its acceptance rate."""
REMAINING_CAP = (1 << 19) - 1
"""Places left beyond this all rank alike (the packed sort key has 20 bits for them)."""
CAPACITY_RANK = {"capacity": 0, "additional-assessment-required": 1, "waitlist": 2}
"""Order among partners that can still take a referral; no-capacity never matches."""


@dataclass(frozen=True, slots=True)
class AgencyChoice:
    """Who follows the person a signal is about (`Directory.resolve_agency`)."""

    agency: Partner | None
    """The pivot: asked for consent, told of every outcome; None: nobody found."""
    why: str
    """How it was found ('named by the signal', 'the source's organisation lmh'…)."""
    ambiguous: tuple[str, ...] = ()
    """With no agency: the organisations whose agencies all cover the commune (the
    signal must name its agency or landlord); empty when none covers it."""

    def refusal(self, commune: str) -> str:
        """Why nobody was picked, as the source hears it."""
        if self.ambiguous:
            return (
                f"several organisations follow people in {commune} "
                f"({', '.join(self.ambiguous)}): the bus does not pick one; send the signal "
                "again naming the agency (`agency`) or the landlord (`landlord`)"
            )
        return f"no agency covers {commune}"


@dataclass(frozen=True, slots=True)
class AgreementRule:
    """What the agreements from one organisation to another allow."""

    general: bool
    """An agreement without needs: every need may travel."""
    needs: frozenset[str]
    """Needs named by need-scoped agreements (a parent code covers its children)."""
    reason: str = ""
    scoped_reason: str = ""


Restrictions = tuple[frozenset[str] | None, frozenset[str] | None, bool, frozenset[str] | None]
"""Age bands, households, QPV only, publics: an entry's eligibility, flattened (None: any)."""


class _EntryHot:
    """The fields a match reads on every entry it visits. A base class's slots come first
    in an instance (a class's own are laid out in sorted order, after its bases'): these
    share one or two cache lines instead of spreading over four."""

    __slots__ = (
        "bailleur",
        "capacity_reason",
        "dup",
        "full",
        "open_to_all",
        "partner",
        "rate_reason",
        "score",
        "score_head",
        "visits",
    )


class Entry(_EntryHot):
    """One partner as matching sees it: its static facts flattened once at load, and the
    live state partners publish (capacity, answers), with the sort keys and reasons that
    follow from that state recomputed on each change rather than on each match."""

    __slots__ = (
        "accepted",
        "answers",
        "cap_rank",
        "live_key",
        "ordinal",
        "ordinal_bits",
        "organisation",
        "pid",
        "rate_key",
        "rem_key",
        "remaining",
        "restrictions",
        "score_tail",
        "sort_key",
        "status",
    )

    def __init__(self, partner: Partner, ordinal: int = 0, ordinal_bits: int = 0) -> None:
        self.partner = partner
        # the id's own copy, allocated with the entry: a candidate's score holds it, and the
        # partner's string sits wherever the file's validation left it (see _build_indexes)
        self.pid = "".join(("", partner.id))
        self.ordinal = ordinal
        """Rank of the partner id among all ids: the tie-break, as an integer."""
        self.ordinal_bits = ordinal_bits
        self.dup = False
        """The entry may be met twice in one match (two nested coverage codes, a need and
        its parent, a repeated code): matching then checks it was not already taken."""
        self.score_head: tuple[int, int, int, int] | None = None
        """The start of the score this entry usually gets (its first coverage code's
        level, exact need, its eligibility rank, a general agreement)."""
        self.score: tuple[object, ...] | None = None
        """score_head + score_tail, built when the live state changes, not per match."""
        self.organisation = sys.intern(partner.organisation)
        self.bailleur = partner.kind == BAILLEUR_SOCIAL
        self.visits = HOME_VISIT in partner.modes
        """It visits people at home: first, within its tier, for a person who wants it."""
        elig = partner.eligibility
        publics = elig.publics if elig.publics and "tous-publics" not in elig.publics else ()
        self.open_to_all = not (elig.age_bands or elig.households or elig.qpv_only or publics)
        self.restrictions: Restrictions | None = (
            None
            if self.open_to_all
            else (
                frozenset(map(sys.intern, elig.age_bands)) if elig.age_bands else None,
                frozenset(map(sys.intern, elig.households)) if elig.households else None,
                elig.qpv_only,
                frozenset(map(sys.intern, publics)) if publics else None,
            )
        )
        """Age bands, households, QPV only, publics: what `match.eligible` reads, flattened."""
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

    def reset_answers(self) -> None:
        self.answers = None
        self.accepted = 0
        self.rate_key = -0.5
        self.rate_reason = "no recent answers"
        self._pack()

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
        # the live key and the id's rank in one integer: within one (territory, need,
        # eligibility, agreement) group, sorting on it is sorting on the rest of the score
        self.sort_key = (self.live_key << self.ordinal_bits) | self.ordinal
        # the end of the candidate's score tuple, shared by every match until it changes
        self.score_tail = (self.cap_rank, remaining, rate, self.pid)
        if self.score_head is not None:
            self.score = self.score_head + self.score_tail

    def set_score_head(self, head: tuple[int, int, int, int]) -> None:
        self.score_head = head
        self.score = head + self.score_tail


ScoreHead = tuple[int, int, int, int]
"""The start of a candidate's score: territory level rank, need level, eligibility rank
(0: aimed at the person's public, 1: open to all), agreement rank (0: need-scoped, 1: any
need or none checked)."""
NeedStep = tuple[int, str, str]
"""One need level as matching walks it: (need level × 4, need code, reason)."""
Level = tuple[int, str, Mapping[str, tuple[Entry, ...]]]
"""One territory as matching walks it: (level rank × 32, the 'covers …' reason, need code →
the entries listing exactly that need and covering exactly that territory, best live key
first, then by id)."""


@dataclass(frozen=True, slots=True)
class MatchIndex:
    """What matching reads of a directory (besides `Directory.sender`, built per sender on
    first use): built once at load, shared with the model, which keeps it current as live
    state (capacity, answers) arrives. `check` and `show` read its chains too.

    Read-only: the mappings are the model's own (typed `Mapping`, never copied, so a look-up
    costs what a dict's does); only the directory changes them. A live-state change updates
    the entries in place and replaces each tuple of entries whole (kept sorted), so a match
    running meanwhile reads either the old order or the new one. `score_heads[k]` is the
    head for k = level rank × 32 + need level × 4 + eligibility rank × 2 + agreement rank:
    a `Level`'s first item plus a `NeedStep`'s first item plus the two ranks.
    """

    territory_chains: Mapping[str, tuple[tuple[str, int], ...]]
    """Commune → its territories with their level rank, most specific first (France last)."""
    need_chains: Mapping[str, tuple[str, ...]]
    """Need code → the code itself, then its parent, up to the root."""
    qpv_commune: Mapping[str, str]
    """QPV code → the commune it lies in."""
    levels: Mapping[str, Level]
    """Territory code → its `Level`; only the territories some partner covers."""
    match_chains: Mapping[str, tuple[Level, ...]]
    """Commune → the `Level`s of its territory chain (most specific first), QPVs excluded."""
    need_steps: Mapping[str, tuple[NeedStep, ...]]
    """Need code → its chain as `NeedStep`s, exact need first."""
    need_sets: Mapping[str, frozenset[str]]
    """Need code → the codes of its chain, as a set (what a need-scoped agreement meets)."""
    entries: Mapping[str, Entry]
    """Partner id → its entry."""
    score_heads: tuple[ScoreHead, ...]
    """Every possible `ScoreHead`, by its packed rank (see the class docstring)."""
    chains_ordered: bool
    """Every commune's chain goes strictly up the levels (as the loaders build it): a match
    walking `match_chains` then meets candidates already ranked and need not sort them."""


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
        local_kinds: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.local_kinds: dict[str, str] = {**LOCAL_KINDS, **(local_kinds or {})}
        """Partner kinds declared local (the project's, then the file's `local_kinds`):
        with data·inclusion's network codes, the kinds `check` accepts without a warning."""
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
        self._creditors = frozenset(p.id for p in self._partners.values() if p.is_creditor)
        """Partners whose relation to the person is a debt (docs/DISCLOSURE.md)."""
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

        # A commune lies in its own département, whichever one its EPCI is filed under:
        # past the commune (and its EPCI), a chain goes through the commune's département.
        # The territories between the two (an EPCI of the Grand Paris for a commune of 93)
        # then lie partly in that département too: `spans` keeps it.
        placed_chains: dict[str, tuple[tuple[str, int], ...]] = {}
        spans: defaultdict[str, set[str]] = defaultdict(set)
        commune_rank = LEVEL_RANK["commune"]
        departement_rank = LEVEL_RANK["departement"]

        def placed(code: str) -> tuple[tuple[str, int], ...]:
            found = placed_chains.get(code)
            if found is not None:
                return found
            chain = found = chain_of(code)
            i = next((i for i, (_, rank) in enumerate(chain) if rank == commune_rank), None)
            if i is not None:
                commune = territories[chain[i][0]]
                dep = own_departement(territories, commune)
                if dep is None and commune.departement is not None:
                    msg = (
                        f"territory: commune {commune.code} ({commune.name}) names "
                        f"unknown département {commune.departement!r}"
                    )
                    raise DirectoryError(msg)
                if dep is not None:
                    j = next(
                        (j for j in range(i + 1, len(chain)) if chain[j][1] >= departement_rank),
                        len(chain),
                    )
                    if j == len(chain) or chain[j][0] != dep:
                        found = (*chain[:j], *chain_of(dep))
                        for between, _ in chain[i + 1 : j]:
                            spans[between].add(tcanon[dep])
            placed_chains[code] = found
            return found

        self._chain: dict[str, tuple[tuple[str, int], ...]] = {}
        self._qpv_commune: dict[str, str] = {}
        for code, territory in territories.items():
            if territory.level == "commune":
                self._chain[code] = placed(code)
            elif territory.level == "qpv" and territory.parent is not None:
                self._qpv_commune[code] = territory.parent
        self._spans: dict[str, tuple[str, ...]] = {
            code: tuple(sorted(deps)) for code, deps in spans.items()
        }
        """Territory (an EPCI) → the départements it lies in besides the one it is filed
        under: those of its communes."""
        self._where: dict[str, str] = {}

        # (territory code → need code → entries): a commune's chain then points straight
        # at the dicts of its territories, so a match never builds or hashes a tuple key
        at: defaultdict[str, defaultdict[str, list[Entry]]] = defaultdict(lambda: defaultdict(list))
        org_entries: defaultdict[str, list[Entry]] = defaultdict(list)
        agencies: defaultdict[str, list[str]] = defaultdict(list)
        needs = self.needs
        need_chains = self._need_chain
        ids = sorted(self._partners)
        coverages: dict[str, tuple[str, ...]] = {}
        for pid in ids:
            partner = self._partners[pid]
            coverage = partner.coverage
            if not FRANCE_ALIASES.isdisjoint(coverage):
                coverage = tuple(FRANCE if c in FRANCE_ALIASES else c for c in coverage)
            for code in coverage:
                if code not in territories:
                    msg = f"partner {pid!r}: coverage code {code!r} is not a known territory"
                    raise DirectoryError(msg)
            for need in partner.needs:
                if need not in needs:
                    msg = f"partner {pid!r}: need {need!r} is not in the taxonomy"
                    raise DirectoryError(msg)
            coverages[pid] = coverage
            if is_pivot(partner) and not partner.is_creditor:
                for code in coverage:
                    agencies[code].append(pid)
        ordinals = {pid: i for i, pid in enumerate(ids)}
        ordinal_bits = max(1, len(ids).bit_length())

        # Entries are created territory by territory (France, région, département, EPCI,
        # commune of their first coverage code), so that the entries, strings and integers
        # one match reads sit together in memory: at national scale a match otherwise pays
        # a cache and TLB miss for nearly every object it touches.
        def place(pid: str) -> tuple[str, ...]:
            coverage = coverages[pid]
            if not coverage:
                return ()
            return tuple(code for code, _ in reversed(placed(coverage[0])))

        # level rank × 32 + need level × 4 + eligibility rank × 2 + agreement rank →
        # the start of a candidate's score
        heads: tuple[ScoreHead, ...] = tuple(
            (k >> 5, (k >> 2) & 7, (k >> 1) & 1, k & 1)
            for k in range((max(LEVEL_RANK.values()) + 1) * 32)
        )
        ancestor_sets: dict[str, frozenset[str]] = {}

        def ancestors_of(code: str) -> frozenset[str]:
            found = ancestor_sets.get(code)
            if found is None:
                # an EPCI crossing département lines encloses each of its communes'
                # départements: a partner covering it and one of them meets a match twice
                above = [c for c, _ in placed(code)[1:]]
                for dep in self._spans.get(code, ()):
                    above.extend(c for c, _ in chain_of(dep))
                found = ancestor_sets[code] = frozenset(above)
            return found

        by_pid: dict[str, Entry] = {}
        for pid in sorted(ids, key=place):
            partner = self._partners[pid]
            coverage = coverages[pid]
            entry = Entry(partner, ordinals[pid], ordinal_bits)
            by_pid[pid] = entry
            org_entries[entry.organisation].append(entry)
            for code in coverage:
                by_need = at[tcanon[code]]
                for need in partner.needs:
                    by_need[ncanon[need]].append(entry)
            entry.dup = _may_repeat(coverage, partner.needs, ancestors_of, need_chains)
            if coverage:
                level = LEVEL_RANK[territories[coverage[0]].level]
                entry.set_score_head(heads[level * 32 + (3 if entry.open_to_all else 1)])
        entries = {pid: by_pid[pid] for pid in ids}
        self._entries = entries
        self._org_entries: dict[str, tuple[Entry, ...]] = {
            k: tuple(v) for k, v in org_entries.items()
        }
        self._agencies: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in agencies.items()}
        # one level of a match: (level rank × 32, 'covers … (…)', need code → entries);
        # only the territories some partner covers. Each tuple of entries is kept sorted
        # on the live key then the id (what ranks partners of one territory and need
        # alike): a match reads them in order and never sorts.
        self._levels: dict[str, tuple[int, str, dict[str, tuple[Entry, ...]]]] = {
            code: (
                LEVEL_RANK[territories[code].level] * 32,
                self._where_text(code),
                {
                    need: (found[0],) if len(found) == 1 else _in_order(found)
                    for need, found in by_need.items()
                },
            )
            for code, by_need in at.items()
        }
        levels = self._levels
        match_chains: dict[str, tuple[Level, ...]] = {
            commune: tuple(levels[code] for code, _ in chain if code in levels)
            for commune, chain in self._chain.items()
        }
        need_steps: dict[str, tuple[NeedStep, ...]] = {
            code: tuple(
                (i * 4, c, "exact need" if i == 0 else self._need_reason[c])
                for i, c in enumerate(chain)
            )
            for code, chain in self._need_chain.items()
        }
        deepest = max((len(c) for c in self._need_chain.values()), default=1)
        if deepest > 8:
            msg = f"a need chain is {deepest} deep; matching ranks at most 8 need levels"
            raise DirectoryError(msg)
        # Matching visits a commune's territories most specific first, and each level's
        # needs exact first: the candidates then come out ranked group by group. A
        # territory graph where a chain does not go strictly up the levels (not one the
        # loaders build) makes matching sort its result instead.
        chains_ordered = all(
            all(a[1] < b[1] for a, b in pairwise(chain))
            and (not chain or chain[0][1] > LEVEL_RANK["qpv"])
            for chain in self._chain.values()
        )
        self._index = MatchIndex(
            territory_chains=self._chain,
            need_chains=self._need_chain,
            qpv_commune=self._qpv_commune,
            levels=levels,
            match_chains=match_chains,
            need_steps=need_steps,
            need_sets={code: frozenset(chain) for code, chain in self._need_chain.items()},
            entries=entries,
            score_heads=heads,
            chains_ordered=chains_ordered,
        )

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
        rules_from: defaultdict[str, list[tuple[str, AgreementRule]]] = defaultdict(list)
        for (src, dst), rule in self._agreements.items():
            rules_from[src].append((dst, rule))
        self._rules_from: dict[str, list[tuple[str, AgreementRule]]] = dict(rules_from)
        self._reach: dict[str, dict[Entry, str | AgreementRule]] = {}
        self._senders: dict[str, tuple[Entry, dict[Entry, str | AgreementRule]]] = {}

    @property
    def index(self) -> MatchIndex:
        """What matching reads (see `MatchIndex`): one object for the directory's life,
        kept current by `apply_capacity`, `record_answer` and `set_answers`."""
        return self._index

    def _where_text(self, code: str) -> str:
        t = self.territories[code]
        if t.level == "commune":
            return f"covers {code} ({t.level})"
        return f"covers {code} ({t.level} {t.name})"

    def reachable_from(self, org: str) -> dict[Entry, str | AgreementRule]:
        """Every entry a referral from `org` may reach: its own organisation's and those
        of the organisations it has an agreement with. The value is the agreement reason
        when any need may travel (agreement rank 1), else the rule, whose needs decide per
        match. Built on first use per organisation, then kept (agreements do not change)."""
        found = self._reach.get(org)
        if found is None:
            found = {}
            org_entries = self._org_entries
            for dst, rule in self._rules_from.get(org, ()):
                value: str | AgreementRule = rule if rule.needs else rule.reason
                for entry in org_entries.get(dst, ()):
                    found[entry] = value
            same = f"same organisation {org}"
            for entry in org_entries.get(org, ()):
                found[entry] = same
            self._reach[org] = found
        return found

    def sender(self, partner_id: str) -> tuple[Entry, dict[Entry, str | AgreementRule]]:
        """The sender's entry and what it may reach (`reachable_from` its organisation),
        kept per sender. KeyError for an unknown partner."""
        found = self._senders.get(partner_id)
        if found is None:
            entry = self._entries[partner_id]
            found = (entry, self.reachable_from(entry.organisation))
            self._senders[partner_id] = found
        return found

    def entries_at(self, need: str, code: str) -> tuple[Entry, ...]:
        """The entries listing exactly this need and covering exactly this territory."""
        level = self._levels.get(code)
        return level[2].get(need, ()) if level is not None else ()

    def where_reason(self, code: str) -> str:
        """'covers 59350 (commune)', cached: the first reason of a candidate."""
        found = self._where.get(code)
        if found is None:
            found = self._where_text(code)
            self._where[code] = found
        return found

    # ---- look-ups ------------------------------------------------------------------------

    def partner(self, partner_id: str) -> Partner:
        """The partner with that id; KeyError if unknown."""
        return self._partners[partner_id]

    def is_creditor(self, partner_id: str) -> bool:
        """Whether the partner is a creditor (`Partner.is_creditor`); one no longer in the
        directory keeps only the roles its relation to the signal gives it."""
        return partner_id in self._creditors

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

    def departements_of(self, code: str) -> tuple[str, ...]:
        """The départements a territory lies in: a commune's own (whichever its EPCI is
        filed under); an EPCI's, the one it is filed under, then any other its communes
        lie in; none above the département level. KeyError for an unknown code."""
        territory = self.territory(code)
        chain = self._chain.get(territory.code)
        codes = (
            [c for c, _ in chain]
            if chain is not None
            else [t.code for t in ancestors(self.territories, territory.code)]
        )
        own = [c for c in codes if self.territories[c].level == "departement"][:1]
        return (*own, *self._spans.get(territory.code, ()))

    def organisation_name(self, org: str) -> str:
        return self.organisations.get(org, org)

    def agreement_rule(self, from_org: str, to_org: str) -> AgreementRule | None:
        """What may travel from one organisation to another; None: nothing."""
        return self._agreements.get((from_org, to_org))

    def pivots_covering(self, commune: str) -> tuple[Partner, ...]:
        """Every pivot (`is_pivot`: a partner with advisors, never a creditor) covering the
        commune, whatever its organisation: the most specific coverage first, then by id."""
        found: list[Partner] = []
        for code, _ in self._chain.get(commune, ()):
            found.extend(self._partners[pid] for pid in self._agencies.get(code, ()))
        return tuple(dict.fromkeys(found))

    def pivot_organisations(self, commune: str) -> tuple[str, ...]:
        """The organisations (landlords, associations) with a pivot covering the commune,
        sorted: more than one, and the commune alone cannot say who follows a person."""
        return tuple(sorted({p.organisation for p in self.pivots_covering(commune)}))

    def agency_for(self, commune: str, organisation: str | None = None) -> Partner | None:
        """An agency following people in the commune: a pivot (a partner with advisors, of
        any kind, never a creditor) covering it, the most specific coverage first, then the
        smallest id; with `organisation`, only that organisation's.

        Without `organisation` this is a directory look-up (`show`, tests), not who follows
        a given person: where several organisations' agencies cover the commune it returns
        the first of them, and the bus never relies on that: a signal's agency is found by
        `resolve_agency`, which refuses to pick among organisations."""
        for partner in self.pivots_covering(commune):
            if organisation is None or partner.organisation == organisation:
                return partner
        return None

    def resolve_agency(
        self,
        commune: str,
        *,
        agency: str | None = None,
        landlord: str | None = None,
        source: str | None = None,
    ) -> AgencyChoice:
        """Who follows the person a signal is about (the pivot asked for consent and told
        of every outcome), in this order: the agency the signal names; the agency of the
        organisation it names as `landlord` covering the commune; the source itself when it
        is a pivot covering the commune, else its own organisation's agency there (a
        landlord's recovery service signals the landlord's tenants); else the only
        organisation's agency covering the commune. When several organisations' agencies
        cover it, none is picked: `ambiguous` names them. Unknown ids are the caller's to
        refuse (`partnerbus.usecases.signals.check_signal`)."""
        if agency is not None:
            return AgencyChoice(self._partners.get(agency), "named by the signal")
        if landlord is not None:
            found = self.agency_for(commune, landlord)
            return AgencyChoice(found, f"the agency of {landlord} covering {commune}")
        pivots = self.pivots_covering(commune)
        if source is not None and source in self._partners:
            own = self._partners[source]
            if own in pivots:
                return AgencyChoice(own, "the source itself")
            mine = next((p for p in pivots if p.organisation == own.organisation), None)
            if mine is not None:
                return AgencyChoice(mine, f"the source's organisation {own.organisation}")
        orgs = tuple(sorted({p.organisation for p in pivots}))
        if len(orgs) == 1:
            return AgencyChoice(pivots[0], f"the only organisation following {commune}")
        return AgencyChoice(None, "", ambiguous=orgs if len(orgs) > 1 else ())

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
        entry = self._entries[partner_id]
        before = entry.sort_key
        entry.set_capacity(status, remaining)
        if entry.sort_key != before:
            self._reorder(entry)

    def record_answer(self, partner_id: str, accepted: bool) -> None:
        """A partner accepted or declined a referral: feeds its recent acceptance rate.
        A partner no longer in the directory is ranked nowhere: nothing to feed."""
        entry = self._entries.get(partner_id)
        if entry is None:
            return
        before = entry.sort_key
        entry.add_answer(accepted)
        if entry.sort_key != before:
            self._reorder(entry)

    def set_answers(self, partner_id: str, answers: Sequence[bool]) -> None:
        """Replace the partner's recent answers (oldest first) with what the durable
        record says: how every worker's directory agrees on acceptance rates."""
        entry = self._entries[partner_id]
        before = entry.sort_key
        entry.reset_answers()
        for accepted in answers[-ANSWER_WINDOW:]:
            entry.add_answer(accepted)
        if entry.sort_key != before:
            self._reorder(entry)

    def _reorder(self, entry: Entry) -> None:
        """Keep every entry tuple holding `entry` sorted after its live key changed.
        Each tuple is replaced whole, so a match running meanwhile reads either order."""
        levels = self._levels
        partner = entry.partner
        for code in partner.coverage:
            at = levels[FRANCE if code in FRANCE_ALIASES else code][2]
            for need in partner.needs:
                found = at[need]
                if len(found) > 1:
                    at[need] = tuple(sorted(found, key=_sort_key))

    def capacity(self, partner_id: str) -> tuple[str, int | None]:
        """The partner's live capacity: (status, remaining)."""
        entry = self._entries[partner_id]
        return entry.status, entry.remaining

    def acceptance(self, partner_id: str) -> tuple[int, int]:
        """(accepted, answered) over the recent window."""
        entry = self._entries[partner_id]
        return entry.accepted, len(entry.answers or ())


_sort_key = attrgetter("sort_key")


def _in_order(found: Iterable[Entry]) -> tuple[Entry, ...]:
    """The entries once each (a partner may repeat a code or a need), best live key first,
    then by id."""
    found = tuple(found)
    if len(found) > 1:
        return tuple(sorted(set(found), key=_sort_key))
    return found


def _may_repeat(
    coverage: Sequence[str],
    needs: Sequence[str],
    territory_ancestors: Callable[[str], frozenset[str]],
    need_chains: Mapping[str, tuple[str, ...]],
) -> bool:
    """Whether one match may meet the partner twice: a coverage code enclosing another
    (a QPV's commune, a commune's EPCI…), a need listed with one of its ancestors, or a
    repeated code or need."""
    if len(coverage) > 1:
        covered = set(coverage)
        if len(covered) != len(coverage):
            return True
        for code in coverage:
            if not covered.isdisjoint(territory_ancestors(code)):
                return True
    if len(needs) > 1:
        listed = set(needs)
        if len(listed) != len(needs):
            return True
        for need in needs:
            chain = need_chains[need]
            if len(chain) > 1 and not listed.isdisjoint(chain[1:]):
                return True
    return False


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
        for dep in directory._spans.get(t.code, ()):
            # an EPCI crossing département lines lies partly within each of them
            edges.append((tkey[t.code], tkey[dep], within))
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
    local_kinds: Mapping[str, str] | None = None,
) -> Directory:
    """Build a directory from plain records (handy in tests)."""
    return Directory(
        territories={t.code: t for t in territories},
        needs={n.code: n for n in needs},
        partners=partners,
        agreements=agreements,
        organisations=organisations,
        name=name,
        local_kinds=local_kinds,
    )
