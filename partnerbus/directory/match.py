"""Matching: for this need, this person, this place, who is the right partner, and why.

One pure function over the directory's indexes. The ranking key, in order:

1. territory: the most specific coverage first (QPV, commune, EPCI, département, région, France);
2. need: a partner listing the exact need before one listing its parent;
3. eligibility: a service aimed at this person's public before a service open to all
   (a service the person is not eligible to is never returned);
4. agreement: a need-scoped agreement before a general one (no agreement, no referral;
   partners of the sender's own organisation need none);
5. capacity: `capacity`, then `additional-assessment-required`, then `waitlist`
   (`no-capacity` and zero remaining are never returned); more places left first;
6. recent acceptance rate: higher first (a smoothed rate over the last answers);
7. partner id: the deterministic tie-break.
"""

from __future__ import annotations

from dataclasses import dataclass

from partnerbus.schemas import Partner, Profile

from .model import REMAINING_CAP, Directory, Entry

SENIOR_BANDS = frozenset({"60-74", "75-plus"})
FAMILY_HOUSEHOLDS = frozenset({"family", "single-parent"})


@dataclass(frozen=True)
class Candidate:
    """A partner that can take the referral, its place in the list and why."""

    partner: Partner
    rank: int
    """1-based position in the list."""
    score: tuple[object, ...]
    """The sort key: smaller ranks first."""
    reasons: tuple[str, ...]

    @property
    def partner_id(self) -> str:
        return self.partner.id


def person_publics(profile: Profile | None) -> frozenset[str]:
    """The data·inclusion publics a profile belongs to, stated or implied."""
    if profile is None:
        return frozenset()
    publics = set(profile.publics)
    if profile.qpv is not None:
        publics.add("residents-qpv-frr")
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
    reasons: list[str] = []
    if elig.age_bands:
        if profile is None or profile.age_band not in elig.age_bands:
            return False, "age band not in " + ", ".join(elig.age_bands)
        reasons.append(f"age {profile.age_band}")
    if elig.households:
        if profile is None or profile.household not in elig.households:
            return False, "household not in " + ", ".join(elig.households)
        reasons.append(f"household {profile.household}")
    if elig.qpv_only:
        qpv = profile.qpv if profile is not None else None
        if qpv is None:
            return False, "QPV residents only"
        known = d._qpv_commune.get(qpv)
        if known is not None and known != commune:
            return False, f"QPV {qpv} is not in {commune}"
        reasons.append(f"QPV resident ({qpv})")
    if elig.publics and "tous-publics" not in elig.publics:
        shared = sorted(person_publics(profile).intersection(elig.publics))
        if not shared:
            return False, "publics: " + ", ".join(elig.publics)
        reasons.append("public " + ", ".join(shared))
    if not reasons:
        return True, "open to all"
    return True, "eligible: " + "; ".join(reasons)


def match(
    d: Directory,
    need: str,
    commune: str,
    profile: Profile | None = None,
    sender: str | None = None,
    exclude: frozenset[str] = frozenset(),
    limit: int | None = None,
) -> list[Candidate]:
    """The partners that can take this need for a person of this commune, best first.

    `sender` is the partner raising the signal: a referral leaves its organisation only
    along an agreement, and never goes back to the sender itself. `exclude` holds the
    partners already tried (rerouting asks again with them excluded). Unknown need or
    commune: no candidate. Unknown sender: KeyError.
    """
    chain = d._chain.get(commune)
    needs = d._need_chain.get(need)
    if chain is None or not needs:
        return []
    entries = d._entries
    seen: set[Entry] = set()
    sender_org = None
    same_org_reason = ""
    if sender is not None:
        sender_entry = entries[sender]
        sender_org = sender_entry.organisation
        same_org_reason = f"same organisation {sender_org}"
        seen.add(sender_entry)
    for pid in exclude:
        excluded = entries.get(pid)
        if excluded is not None:
            seen.add(excluded)
    if profile is not None and profile.qpv and d._qpv_commune.get(profile.qpv) == commune:
        chain = ((profile.qpv, 0), *chain)
    index = d._index
    agreements = d._agreements
    needs_set = frozenset(needs)
    seen_add = seen.add

    rows: list[Row] = []
    for code, level in chain:
        if limit is not None and len(rows) >= limit:
            # every later territory ranks after what is already found
            break
        for need_level, need_code in enumerate(needs):
            found = index.get((need_code, code))
            if found is None:
                continue
            for e in found:
                if e in seen:
                    continue
                if need_level and e.bailleur:
                    # a landlord's service gets only the needs it lists explicitly; it may
                    # still match the exact need further up the territory chain
                    continue
                seen_add(e)
                if e.full:
                    continue
                if e.open_to_all:
                    elig_rank, elig_reason = 1, "open to all"
                else:
                    ok, elig_reason = eligible(d, e.partner, commune, profile)
                    if not ok:
                        continue
                    elig_rank = 0
                if sender_org is None:
                    agr_rank, agr_reason = 1, "no sender: agreement not checked"
                elif sender_org == e.organisation:
                    agr_rank, agr_reason = 1, same_org_reason
                else:
                    rule = agreements.get((sender_org, e.organisation))
                    if rule is None:
                        continue
                    if rule.needs and not needs_set.isdisjoint(rule.needs):
                        agr_rank, agr_reason = 0, rule.scoped_reason
                    elif rule.general:
                        agr_rank, agr_reason = 1, rule.reason
                    else:
                        continue
                rows.append(
                    (
                        ((level * 8 + need_level) * 4 + elig_rank * 2 + agr_rank) << 33
                        | e.live_key,
                        e.pid,
                        e,
                        code,
                        level,
                        need_level,
                        need_code,
                        elig_rank,
                        agr_rank,
                        elig_reason,
                        agr_reason,
                    )
                )
    # (packed key, partner id) is unique: the sort never compares further
    rows.sort()
    if limit is not None:
        del rows[limit:]
    return _candidates(d, rows)


_new = object.__new__
Row = tuple[int, str, Entry, str, int, int, str, int, int, str, str]
"""(packed sort key, partner id, entry, territory code, territory level, need level,
need code, eligibility rank, agreement rank, eligibility reason, agreement reason)"""


def _candidates(d: Directory, rows: list[Row]) -> list[Candidate]:
    """Candidates from sorted rows. A frozen dataclass's __init__ goes through
    object.__setattr__ field by field; filling the instance dict directly is 3x faster,
    which is a third of a national-scale match."""
    where_cache = d._where
    where = d.where_reason
    need_reason = d._need_reason
    out: list[Candidate] = []
    append = out.append
    for rank, row in enumerate(rows, start=1):
        _, pid, e, code, level, need_level, need_code, elig, agr, er, ar = row
        c = _new(Candidate)
        fields = c.__dict__
        fields["partner"] = e.partner
        fields["rank"] = rank
        fields["score"] = (
            level,
            need_level,
            elig,
            agr,
            e.cap_rank,
            max(e.rem_key, -REMAINING_CAP),
            e.rate_key,
            pid,
        )
        fields["reasons"] = (
            where_cache.get(code) or where(code),
            "exact need" if need_level == 0 else need_reason[need_code],
            er,
            ar,
            e.capacity_reason,
            e.rate_reason,
        )
        append(c)
    return out
