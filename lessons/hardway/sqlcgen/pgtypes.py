"""What PostgreSQL types become in Python, and the tables and enums of the schema.

sqlc reports a type by the name it was written with, so one PostgreSQL type has several
spellings: `integer`, `int4` and `pg_catalog.int4` all arrive, as do `now()`'s
`timestamp with time zone` and a literal `1`'s plain `int`. The table below lists every spelling
of the types the generated code supports. Anything else fails generation with a message naming
the column and the type: generating a wrong annotation, or a value psycopg cannot send, would
only move the error to run time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hardway.sqlcgen import names


class GenerationError(Exception):
    """A problem in the schema or queries; the message is shown to the user as it is."""


@dataclasses.dataclass(frozen=True)
class PyType:
    """The Python side of one PostgreSQL type."""

    annotation: str  # "int", "datetime.datetime", "Any", or an enum class of models.py
    module: str | None = None  # module to import for the annotation ("datetime")
    enum: bool = False  # results are converted with the enum class: psycopg returns a str
    json: str | None = None  # "Json" / "Jsonb": psycopg sends a parameter only when wrapped
    # psycopg turns an array into a list only for element types it knows by OID, the built-in
    # ones. An array of an enum or of citext would arrive as the string '{a,b}'.
    array_loads: bool = True


def _spellings(pytype: PyType, *names: str) -> dict[str, PyType]:
    return dict.fromkeys(names, pytype)


_DATETIME = "datetime"

BUILTIN_TYPES: dict[str, PyType] = {
    **_spellings(PyType("bool"), "bool", "boolean"),
    **_spellings(
        PyType("int"),
        *("int2", "int4", "int8", "smallint", "integer", "bigint", "int"),
        *("smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"),
    ),
    **_spellings(PyType("float"), "float4", "float8", "real", "double precision"),
    **_spellings(PyType("decimal.Decimal", "decimal"), "numeric", "decimal"),
    # sqlc calls a literal such as 1.5 `float`, but PostgreSQL types it numeric, and psycopg
    # returns a Decimal for it.
    "float": PyType("decimal.Decimal", "decimal"),
    **_spellings(PyType("str"), "text", "varchar", "character varying", "bpchar", "name"),
    # citext is an extension type: psycopg does not know its OID and returns the text as str.
    "citext": PyType("str", array_loads=False),
    "bytea": PyType("bytes"),
    "uuid": PyType("uuid.UUID", "uuid"),
    **_spellings(
        PyType("datetime.datetime", _DATETIME),
        *("timestamptz", "timestamp with time zone"),
        *("timestamp", "timestamp without time zone"),
    ),
    "date": PyType("datetime.date", _DATETIME),
    **_spellings(PyType("datetime.time", _DATETIME), "time", "time without time zone"),
    "interval": PyType("datetime.timedelta", _DATETIME),
    "json": PyType("Any", "typing", json="Json"),
    "jsonb": PyType("Any", "typing", json="Jsonb"),
}


@dataclasses.dataclass(frozen=True)
class ValueType:
    """The type of one column or parameter: a PyType, maybe in arrays, maybe NULL."""

    pytype: PyType
    array_dims: int
    nullable: bool

    def annotation(self, models_prefix: str) -> str:
        """`list[models.TaskStatus] | None`; enums are prefixed outside models.py."""
        text = self.pytype.annotation
        if self.pytype.enum:
            text = models_prefix + text
        for _ in range(self.array_dims):
            text = f"list[{text}]"
        # `Any` (json) already admits None: `Any | None` would only make a type checker insist
        # on a None check before every use of a JSON value.
        return f"{text} | None" if self.nullable and text != "Any" else text


@dataclasses.dataclass
class Enum:
    class_name: str
    values: list[str]
    comment: str


@dataclasses.dataclass
class Table:
    schema: str
    name: str
    class_name: str
    columns: list[dict[str, Any]]
    comment: str


class Catalog:
    """The schema sqlc parsed: its tables and enums, with the class names they get."""

    # Schemas sqlc always describes, and whose tables no query result is generated for.
    SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

    def __init__(self, catalog: dict[str, Any]) -> None:
        self.default_schema = catalog.get("default_schema") or "public"
        self.enums: dict[tuple[str, str], Enum] = {}
        self.tables: list[Table] = []
        for schema in catalog.get("schemas") or []:
            schema_name = schema.get("name", "")
            if schema_name in self.SYSTEM_SCHEMAS:
                continue
            for enum in schema.get("enums") or []:
                key = (schema_name, enum["name"])
                self.enums[key] = Enum(
                    self._class_name(key, singularise=False),
                    list(enum.get("vals") or []),
                    enum.get("comment", ""),
                )
            for table in schema.get("tables") or []:
                key = (schema_name, table["rel"]["name"])
                self.tables.append(
                    Table(
                        *key,
                        self._class_name(key, singularise=True),
                        list(table.get("columns") or []),
                        table.get("comment", ""),
                    )
                )
        self._check_unique_class_names()

    def _class_name(self, key: tuple[str, str], *, singularise: bool) -> str:
        # Objects outside the default schema carry the schema in their name, as in sqlc's Go
        # output: other.color -> OtherColor.
        schema, name = key
        full = name if schema == self.default_schema else f"{schema}_{name}"
        return names.class_name(full, singularise=singularise)

    def _check_unique_class_names(self) -> None:
        owners: dict[str, str] = {}
        things = [(e.class_name, f'enum "{n}"') for (_, n), e in self.enums.items()]
        things += [(t.class_name, f'table "{self.display(t.schema, t.name)}"') for t in self.tables]
        for class_name, what in things:
            if class_name in owners:
                raise GenerationError(
                    f"{owners[class_name]} and {what} would both become class {class_name} "
                    "in models.py: rename one of them"
                )
            owners[class_name] = what

    def display(self, schema: str, name: str) -> str:
        """A type or table name as a user would write it: schema only when it matters."""
        return name if schema in ("", "pg_catalog", self.default_schema) else f"{schema}.{name}"

    def value_type(self, column: dict[str, Any], what: str, *, result: bool) -> ValueType:
        """The ValueType of a column or parameter; `what` names it in errors.

        `result` is true for values that psycopg will return, which must be values it can load.
        """
        if column.get("embed_table"):
            raise GenerationError(f"{what} uses sqlc.embed(), which is not supported")
        if column.get("is_sqlc_slice"):
            raise GenerationError(
                f"{what} uses sqlc.slice(), which is not supported: "
                "write `= ANY(@name::type[])` and pass a list"
            )
        ref = column.get("type") or {}
        schema, name = ref.get("schema", ""), ref.get("name", "")
        if not schema and "." in name:
            # Parameters of INSERT and UPDATE arrive as {"name": "pg_catalog.int4"}.
            schema, name = name.split(".", 1)
        if name in ("any", "unknown", ""):
            example = "(expression)::text" if result else "@name::text or $1::text"
            raise GenerationError(
                f"{what} has a type sqlc cannot infer: add a cast, e.g. {example}"
            )
        if name == "void":
            raise GenerationError(f"{what} has type void, which carries no value: use :exec")
        pytype = None
        if schema in ("", "pg_catalog"):
            pytype = BUILTIN_TYPES.get(name)
        if pytype is None:
            enum = self.enums.get((schema or self.default_schema, name))
            if enum is not None:
                pytype = PyType(enum.class_name, enum=True, array_loads=False)
        type_name = self.display(schema, name)
        if pytype is None:
            raise GenerationError(f'{what} has unsupported PostgreSQL type "{type_name}"')
        array_dims = column.get("array_dims") or (1 if column.get("is_array") else 0)
        if array_dims and pytype.json:
            raise GenerationError(f'{what} is an array of "{type_name}", which is not supported')
        if array_dims and result and not pytype.array_loads:
            raise GenerationError(
                f'{what} is an array of "{type_name}", which psycopg would return as one '
                "string: cast it to text[]"
            )
        return ValueType(pytype, array_dims, nullable=not column.get("not_null"))

    def table_for(self, columns: list[dict[str, Any]]) -> Table | None:
        """The table whose full column list `columns` is, in order (`SELECT *`), if any."""
        for table in self.tables:
            if len(table.columns) == len(columns) and all(
                self._same_column(table, table_column, column)
                for table_column, column in zip(table.columns, columns, strict=True)
            ):
                return table
        return None

    def _same_column(self, table: Table, table_column: dict[str, Any], column: dict) -> bool:
        ref = column.get("table") or {}
        # An outer join makes a NOT NULL column nullable: then it is no longer the model.
        keys = ("name", "type", "not_null", "is_array", "array_dims")
        return (
            ref.get("name") == table.name
            and (ref.get("schema") or self.default_schema) == table.schema
            and all(table_column.get(key) == column.get(key) for key in keys)
        )
