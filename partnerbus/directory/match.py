"""Matching: for this need, this person, this place, who is the right partner, and why.

One pure function over the directory's public match index (`Directory.index`). The ranking
key, in order:

1. territory: the most specific coverage first (QPV, commune, EPCI, département, région, France);
2. need: a partner listing the exact need before one listing its parent;
3. eligibility: a service aimed at this person's public before a service open to all
   (a service the person is not eligible to is never returned; a QPV code counts only when
   the directory knows it in the person's commune, any other is ignored and said so);
4. agreement: a need-scoped agreement before a general one (no agreement, no referral;
   partners of the sender's own organisation need none);
5. a home visit, when the person wants one: a partner that visits at home (`local-a-domicile`
   in its `modes`) before one that does not (only then: it never outranks 1-4);
6. capacity: `capacity`, then `additional-assessment-required`, then `waitlist`
   (`no-capacity` and zero remaining are never returned); more places left first;
7. recent acceptance rate: higher first (a smoothed rate over the last answers);
8. partner id: the deterministic tie-break.
"""

from __future__ import annotations

from dataclasses import dataclass

from partnerbus.directory.model import Directory, Entry, Restrictions
from partnerbus.schemas import Partner, Profile

SENIOR_BANDS = frozenset({"60-74", "75-plus"})
FAMILY_HOUSEHOLDS = frozenset({"family", "single-parent"})
QPV_PUBLIC = "residents-qpv-frr"
OPEN_TO_ALL = "open to all"


@dataclass(frozen=True)
class Candidate:
    """A partner that can take the referral, its place in the list and why."""

    partner: Partner
    rank: int
    """1-based position in the list."""
    score: tuple[object, ...]
    """The sort key: smaller ranks first. With a home visit wanted, it holds one more item
    after the agreement rank: 0 for a partner that visits at home, 1 for one that does not."""
    reasons: tuple[str, ...]

    @property
    def partner_id(self) -> str:
        return self.partner.id


def resident_qpv(d: Directory, commune: str, profile: Profile | None) -> str | None:
    """The profile's QPV when it counts: a QPV the directory knows, located in the person's
    commune. Any other QPV code is an unknown fact and never qualifies anyone."""
    qpv = profile.qpv if profile is not None else None
    if qpv is not None and d.index.qpv_commune.get(qpv) == commune:
        return qpv
    return None


def ignored_qpv(d: Directory, commune: str, profile: Profile | None) -> str | None:
    """Why the profile's QPV is ignored for eligibility (unknown to the directory or not in
    the commune), or None when there is no QPV or it counts."""
    if profile is None or profile.qpv is None or resident_qpv(d, commune, profile):
        return None
    return _ignored(profile.qpv, commune)


def _ignored(qpv: str, commune: str) -> str:
    return f"QPV {qpv} ignored (not a known QPV of {commune})"


def person_publics(profile: Profile | None, qpv: str | None = None) -> frozenset[str]:
    """The data·inclusion publics a profile belongs to, stated or implied. `qpv` is the
    person's QPV once checked (`resident_qpv`): only a checked QPV implies
    `residents-qpv-frr`."""
    if profile is None:
        return frozenset()
    publics = set(profile.publics)
    if qpv is not None:
        publics.add(QPV_PUBLIC)
    if profile.age_band in SENIOR_BANDS:
        publics.add("seniors")
    if profile.household in FAMILY_HOUSEHOLDS:
        publics.add("familles")
    return frozenset(publics)


def eligible(
    d: Directory, partner: Partner, commune: str, profile: Profile | None
) -> tuple[bool, str]:
    """Whether the person is eligible, and a reason. Unknown facts never make someone
    eligible to a restricted service: it is then left out rather than guessed."""
    elig = partner.eligibility
    qpv = resident_qpv(d, commune, profile)
    ignored = ignored_qpv(d, commune, profile)
    reasons: list[str] = []
    if elig.age_bands:
        if profile is None or profile.age_band not in elig.age_bands:
            return False, "age band not in " + ", ".join(elig.age_bands)
        reasons.append(f"age {profile.age_band}")
    if elig.households:
        if profile is None or profile.household not in elig.households:
            return False, "household not in " + ", ".join(elig.households)
        reasons.append(f"household {profile.household}")
    about_qpv = elig.qpv_only
    if elig.qpv_only:
        if qpv is None:
            return False, "QPV residents only" + (f"; {ignored}" if ignored else "")
        reasons.append(f"QPV resident ({qpv})")
    if elig.publics and "tous-publics" not in elig.publics:
        about_qpv = about_qpv or QPV_PUBLIC in elig.publics
        shared = sorted(person_publics(profile, qpv).intersection(elig.publics))
        if not shared:
            why = "publics: " + ", ".join(elig.publics)
            return False, why + (f"; {ignored}" if ignored and about_qpv else "")
        reasons.append("public " + ", ".join(shared))
    if not reasons:
        return True, OPEN_TO_ALL
    if ignored and about_qpv:
        reasons.append(ignored)
    return True, "eligible: " + "; ".join(reasons)


NO_SENDER = "no sender: agreement not checked"
VISITS = "visits at home (home visit wanted)"
NO_VISITS = "no home visits (home visit wanted)"
_new = object.__new__


def match(
    d: Directory,
    need: str,
    commune: str,
    profile: Profile | None = None,
    sender: str | None = None,
    exclude: frozenset[str] = frozenset(),
    limit: int | None = None,
    home_visit: bool = False,
) -> list[Candidate]:
    """The partners that can take this need for a person of this commune, best first.

    `sender` is the partner raising the signal: a referral leaves its organisation only
    along an agreement, and never goes back to the sender itself. `exclude` holds the
    partners already tried (rerouting asks again with them excluded). `home_visit`: the
    person wants one, so within the same territory, need, eligibility and agreement rank,
    partners that visit at home come first (and the reasons say whether each does). Unknown
    need or commune: no candidate. Unknown sender: no agreement, so no candidate either.
    """
    # Everything static is precomputed at load (see MatchIndex): the commune's chain of
    # territory levels, each holding its need → entries dict, every tuple of entries kept
    # sorted on (live key, id); the need chain with its reasons; the entries reachable from
    # each sender's organisation (built on its first match); each entry's usual score.
    # Candidates come out ranked, territory by territory and need level by need level: no
    # sort, no per-call key.
    index = d.index
    chain = index.match_chains.get(commune)
    steps = index.need_steps.get(need)
    if chain is None or not steps:
        return []
    sender_entry = None
    reach = None
    if sender is not None:
        try:
            sender_entry, reach = d.sender(sender)
        except KeyError:
            # a sender the directory does not know (never did, or was removed since its
            # signal): no agreement to travel along, so nobody may receive its referral
            return []
    skip = None
    if exclude:
        entries = index.entries
        skip = {entries[pid] for pid in exclude if pid in entries}
    qpv = ignored = None
    if profile is not None and profile.qpv is not None:
        # a QPV counts only when the directory knows it in this commune: any other code is
        # an unknown fact, ignored for coverage and eligibility (and said so)
        if index.qpv_commune.get(profile.qpv) == commune:
            qpv = profile.qpv
            qpv_level = index.levels.get(qpv)
            if qpv_level is not None:
                chain = (qpv_level, *chain)
        else:
            ignored = _ignored(profile.qpv, commune)
    heads = index.score_heads
    seen: set[Entry] | None = None
    out: list[Candidate] = []
    add = out.append

    for level_base, where, at in chain:
        if limit is not None and len(out) >= limit:
            # every later territory ranks after what is already found
            break
        for need_base, need_code, need_reason in steps:
            found = at.get(need_code)
            if found is None:
                continue
            base = level_base + need_base
            start = len(out)
            group_k = -1
            mixed = False
            visitors = 0
            # `found` is sorted on (live key, id): within this territory and need level,
            # candidates only need grouping by eligibility and agreement rank (k)
            for e in found:
                if e.full or e is sender_entry:
                    continue
                if need_base and e.bailleur:
                    # a landlord's service gets only the needs it lists explicitly; it may
                    # still match the exact need further up the territory chain
                    continue
                if skip is not None and e in skip:
                    continue
                if e.open_to_all:
                    k = 2
                    elig_reason = OPEN_TO_ALL
                elif profile is None:
                    continue  # unknown facts never qualify for a restricted service
                else:
                    why = _eligible(e.restrictions, profile, qpv, ignored)
                    if why is None:
                        continue
                    elig_reason = why
                    k = 0
                if reach is None:
                    k += 1
                    agr_reason = NO_SENDER
                else:
                    rule = reach.get(e)
                    if rule is None:
                        continue
                    if isinstance(rule, str):  # any need may travel
                        k += 1
                        agr_reason = rule
                    elif not index.need_sets[need].isdisjoint(rule.needs):
                        agr_reason = rule.scoped_reason
                    elif rule.general:
                        k += 1
                        agr_reason = rule.reason
                    else:
                        continue
                if e.dup:
                    # met again further up the chain: the first (best) place stands
                    if seen is None:
                        seen = set()
                    elif e in seen:
                        continue
                    seen.add(e)
                if k != group_k:
                    mixed = group_k >= 0
                    group_k = k
                # a frozen dataclass's __init__ goes through object.__setattr__ field by
                # field; filling the instance dict directly is 3x faster
                c = _new(Candidate)
                fields = c.__dict__
                fields["partner"] = e.partner
                fields["rank"] = len(out) + 1
                head = heads[base + k]
                if home_visit:
                    # the wish's own path: one more item in the score, one more reason
                    visitors += e.visits
                    fields["score"] = (*head, 0 if e.visits else 1, *e.score_tail)
                    fields["reasons"] = (
                        where,
                        need_reason,
                        elig_reason,
                        agr_reason,
                        e.capacity_reason,
                        e.rate_reason,
                        VISITS if e.visits else NO_VISITS,
                    )
                    add(c)
                    continue
                # most entries get their usual head: their score is already built
                fields["score"] = e.score if e.score_head is head else head + e.score_tail
                fields["reasons"] = (
                    where,
                    need_reason,
                    elig_reason,
                    agr_reason,
                    e.capacity_reason,
                    e.rate_reason,
                )
                add(c)
            if visitors and visitors < len(out) - start:
                # a stable sort on (eligibility, agreement, visits) keeps the live order within
                out[start:] = sorted(out[start:], key=_elig_agr_visit)
                _renumber(out, start)
            elif mixed:
                # a stable sort on (eligibility, agreement) keeps the live order within
                out[start:] = sorted(out[start:], key=_elig_agr)
                _renumber(out, start)
    if not index.chains_ordered:
        out.sort(key=_score)
        _renumber(out, 0)
    if limit is not None:
        del out[limit:]
    return out


def _eligible(
    restrictions: Restrictions | None, profile: Profile, qpv: str | None, ignored: str | None
) -> str | None:
    """`eligible()` on an entry's flattened restrictions, with the person's checked QPV
    (`resident_qpv`) and the note when a QPV was ignored: the reason, or None when the
    person is not eligible."""
    if restrictions is None:
        return OPEN_TO_ALL
    age_bands, households, qpv_only, publics = restrictions
    reasons: list[str] = []
    if age_bands is not None:
        if profile.age_band not in age_bands:
            return None
        reasons.append(f"age {profile.age_band}")
    if households is not None:
        if profile.household not in households:
            return None
        reasons.append(f"household {profile.household}")
    if qpv_only:
        if qpv is None:
            return None
        reasons.append(f"QPV resident ({qpv})")
    if publics is not None:
        shared = sorted(person_publics(profile, qpv).intersection(publics))
        if not shared:
            return None
        reasons.append("public " + ", ".join(shared))
    if ignored is not None and (qpv_only or (publics is not None and QPV_PUBLIC in publics)):
        reasons.append(ignored)
    return "eligible: " + "; ".join(reasons)


def _elig_agr(c: Candidate) -> tuple[object, ...]:
    return c.score[2:4]


def _elig_agr_visit(c: Candidate) -> tuple[object, ...]:
    return c.score[2:5]


def _score(c: Candidate) -> tuple[object, ...]:
    return c.score


def _renumber(out: list[Candidate], start: int) -> None:
    for rank in range(start, len(out)):
        out[rank].__dict__["rank"] = rank + 1
