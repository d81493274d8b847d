"""`ddpmctl samplers`: installed sampler plugins, their options with defaults, providing package; broken ones too."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ddpmctl.cli.common import guarded, out_console, print_json


def samplers_payload() -> list[dict[str, Any]]:
    """One row per entry point of ``ddpmctl.samplers``: usable ones with options, broken ones with their error."""
    from ddpmctl.samplers import available_samplers, describe_options

    rows = []
    for name, entry in available_samplers().items():
        row: dict[str, Any] = {"name": name, "entry_point": entry.value, "package": entry.package,
                               "ok": entry.ok}
        if entry.cls is not None:
            row["description"] = entry.cls.description
            row["options"] = describe_options(entry.cls)
        else:
            row["error"] = entry.error
            row["incompatible"] = entry.incompatible
        rows.append(row)
    return rows


def _format_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _option_line(option: dict[str, Any]) -> str:
    """'eta=0.0 (float): noise scale ...': how to set it, its default and type, then what it does."""
    line = f"{option['name']}={_format_default(option['default'])} ({option['type']})"
    return f"{line}: {option['description']}" if option["description"] else line


@guarded
def samplers_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON on stdout.")] = False,
) -> None:
    """List the installed sampler plugins (entry-point group ddpmctl.samplers) and their -O options."""
    rows = samplers_payload()
    if json_output:
        print_json(rows)
        return
    table = Table(show_lines=True, expand=True)  # the options column, with each description, gets the most room
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description", overflow="fold", ratio=2)  # errors are shown whole, never cut with an ellipsis
    table.add_column("options (-O key=value)", overflow="fold", ratio=3)
    table.add_column("package", overflow="fold")
    for row in rows:
        if row["ok"]:
            options = "\n".join(_option_line(o) for o in row["options"]) or "-"
            table.add_row(row["name"], row["description"], options, row["package"] or "-")
        else:
            state = "incompatible" if row["incompatible"] else "broken"
            table.add_row(row["name"], f"[red]{state}: {row['error']}[/red]", "-", row["package"] or "-")
    out_console.print(table)
