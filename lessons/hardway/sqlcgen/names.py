"""Python names for SQL names: snake_case, CamelCase, singular class names, no clashes.

Every rule here is deliberately small, so that a reader can predict the generated name:

- A name is split into words at `_`, at any other non-alphanumeric character and at case changes:
  `ClaimTask` -> claim, task; `task_attempts` -> task, attempt(s); `HTTPStatus` -> http, status.
- Tables become classes by singularising the last word only (see `singular`).
- A name that is a Python keyword, or would hide a name the generated code itself uses, gets a
  trailing underscore (`from` -> `from_`); a second `created_at` in the same list becomes
  `created_at_2`.
"""

from __future__ import annotations

import keyword
import re


def words(name: str) -> list[str]:
    """Split `name` into words: `ClaimTask` / `claim_task` / `claim-task` -> [claim, task]."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)  # claimTask -> claim Task
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name)  # HTTPStatus -> HTTP Status
    return [word for word in re.split(r"[\W_]+", name) if word]


def snake(name: str) -> str:
    """`ClaimTask` -> `claim_task`; used for methods, fields, parameters and modules."""
    return "_".join(word.lower() for word in words(name))


def upper_snake(name: str) -> str:
    """`ClaimTask` -> `CLAIM_TASK`; used for SQL constants and enum members."""
    return "_".join(word.upper() for word in words(name))


def camel(name: str) -> str:
    """`task_status` -> `TaskStatus`, `GetTaskByID` -> `GetTaskByID` (inner capitals are kept)."""
    return "".join(word[0].upper() + word[1:] for word in words(name))


def singular(word: str) -> str:
    """English singular of a table name's last word, by a rule small enough to remember.

    `-ies` -> `-y` (categories); `-sses`, `-tuses`, `-xes`, `-ches`, `-shes` lose `-es`
    (classes, statuses, boxes, batches); words ending in `ss`, `us` or `is` are already singular
    (status, analysis);
    otherwise one trailing `s` is dropped (tasks, task_attempts). Anything else stays as it is.
    """
    lower = word.lower()
    if lower.endswith("ies") and len(word) > 3:
        return word[:-3] + ("Y" if word[-3:].isupper() else "y")
    if lower.endswith(("sses", "tuses", "xes", "ches", "shes")):
        return word[:-2]
    if lower.endswith(("ss", "us", "is")):
        return word
    if lower.endswith("s") and len(word) > 1:
        return word[:-1]
    return word


def class_name(name: str, *, singularise: bool = False) -> str:
    """CamelCase class name; tables are singularised (`task_attempts` -> `TaskAttempt`)."""
    parts = words(name)
    if singularise and parts:
        parts[-1] = singular(parts[-1])
    return identifier(camel("_".join(parts)), fallback="Unnamed")


def identifier(name: str, *, fallback: str, reserved: frozenset[str] = frozenset()) -> str:
    """Make `name` a usable Python identifier.

    An empty name (sqlc gives no name to an unaliased expression such as `1 + 1`) becomes
    `fallback`; a leading digit gets a `_` in front; keywords and `reserved` names get a `_`
    appended.
    """
    if not name:
        name = fallback
    if not (name[0].isalpha() or name[0] == "_"):
        name = "_" + name
    if keyword.iskeyword(name) or name in reserved:
        name += "_"
    return name


def dedupe(names: list[str]) -> list[str]:
    """Number repeated names, in order: [id, id, name] -> [id, id_2, name]."""
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        result.append(candidate)
    return result
