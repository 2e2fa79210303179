"""The telehealth catalogue: the only values of the event contract's text fields that reach the telehealth store.

Apps and devices put text in some fields of the event contract (transforms/events.py), and text is where names,
dates of birth and spreadsheet formulas travel: one app sent the education module
``=HYPERLINK("http://x","Jane Roe DOB 1950-01-01 HIV+")``. The telehealth store (warehouse/telehealth.py) keeps
a value of these fields only if it is in this catalogue; any other value is stored as ``OTHER`` ("other"),
while the raw value stays in the clinical stream (``telehealth_events`` in the encrypted warehouse), where the
practice can see what was sent.

=================  ==========================================================================================
field              catalogued values
=================  ==========================================================================================
module             EDUCATION_MODULES (slugs of the education content the apps offer)
survey             SURVEYS (validated instruments: PHQ-2/9, GAD-2/7, CAT for COPD, KCCQ-12 for heart failure)
modality           MODALITIES of the contract (video, phone, in_person); the telehealth suite quarantines others
firmware           FIRMWARE: the versions released for each device kind (bp: 2.4.1, 2.5.0; ...)
condition          the registry's conditions, each mapped to a care programme (PROGRAMME_OF); none: "other"
=================  ==========================================================================================

A practice extends the modules and surveys with ``RPM_TELEHEALTH_CATALOGUE_EXTRA`` (core/settings.py), e.g.
``module:heart-healthy-eating,survey:ipaq``: lowercase letters, digits and hyphens only (``SLUG_RE``), so an
addition can be a content slug but never a formula or a sentence. What it adds is the practice's own
responsibility: a slug must name content, not a person.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from transforms.events import MODALITIES

OTHER = "other"

EDUCATION_MODULES = frozenset({
    # hypertension
    "bp-basics", "salt-and-blood-pressure", "measuring-your-blood-pressure", "taking-your-medications",
    # diabetes
    "glucose-monitoring", "carb-counting", "hypoglycemia", "foot-care",
    # COPD
    "inhaler-technique", "breathing-exercises", "copd-action-plan",
    # heart failure
    "daily-weights", "fluid-and-salt", "heart-failure-symptoms",
    # every programme
    "physical-activity", "healthy-eating", "quitting-smoking", "using-your-device",
})
SURVEYS = frozenset({"phq-2", "phq-9", "gad-2", "gad-7", "cat", "kccq-12"})

# Firmware is reported per device kind, to follow an update through the fleet: only the versions released for
# the kind count. A pattern would not do: "digits and dots" lets an SSN (123.45.6789), a phone number
# (555.867.5309), a birth date (1950.01.01) or an IP address through. A version missing here ("2.4.1-build Jane",
# "=cmd", a new release) is stored as "other"; add a release to its kind's list when the vendor ships it.
FIRMWARE = {
    "bp": frozenset({"2.4.1", "2.5.0"}),
    "glu": frozenset({"1.9.3"}),
    "cgm": frozenset({"7.1.0", "7.2.2"}),
    "ox": frozenset({"3.0.8"}),
    "scale": frozenset({"1.2.0", "1.3.1"}),
    "thermo": frozenset({"0.9.5"}),
}

# The registry's conditions (warehouse/registry.CONDITIONS) as coarse care programmes: what RPM programmes a
# practice runs, never a finer diagnosis. A condition missing here (an older registry's) is "other".
PROGRAMMES = ("hypertension", "diabetes", "heart_failure", "copd", OTHER)
PROGRAMME_OF = {"hypertension": "hypertension", "diabetes": "diabetes", "heart_failure": "heart_failure",
                "copd": "copd"}

SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
EXTENSIBLE = ("module", "survey")  # the fields RPM_TELEHEALTH_CATALOGUE_EXTRA may add to (checked there too)


def listed(extra: str = "") -> dict[str, frozenset[str]]:
    """The listed values per field: the built-in lists plus the practice's ``extra`` ("field:slug,...")."""
    values = {"module": set(EDUCATION_MODULES), "survey": set(SURVEYS), "modality": set(MODALITIES)}
    for entry in filter(None, (e.strip() for e in extra.split(","))):
        field, _, slug = entry.partition(":")
        if field not in EXTENSIBLE or not SLUG_RE.fullmatch(slug):
            raise ValueError(f"catalogue entry {entry!r}: use module:<slug> or survey:<slug> (slug: lowercase "
                             "letters, digits and hyphens)")
        values[field].add(slug)
    return {field: frozenset(v) for field, v in values.items()}


def rows(extra: str = "") -> Iterator[tuple[str, str, str]]:
    """(field, value, stored as) for every listed value, condition and firmware version (field
    ``firmware:<device kind>``): the table the store's build joins on."""
    for field, values in listed(extra).items():
        yield from ((field, v, v) for v in sorted(values))
    yield from (("condition", c, p) for c, p in PROGRAMME_OF.items())
    yield from ((f"firmware:{kind}", v, v) for kind, versions in FIRMWARE.items() for v in sorted(versions))

