"""Shopping lists kept from stock levels: pure state, changes returned as values.

An item is on a list while at least one device feeding that list reports it below its
minimum; the list changes when the first device reports it low (``added``), when a low level
changes or another device reports it low too (``updated``), and when the last device reports
it restocked (``removed``). Every change is returned as a `ShoppingListChanged`, so the shell
can store it, notify observers of ``/lists/NAME`` and relay it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

ListAction = Literal["added", "updated", "removed"]


@dataclass(frozen=True, kw_only=True)
class ShoppingListChanged:
    """One change to a shopping list."""

    list_name: str
    item: str
    action: ListAction
    #: The stock level the reporting device gave (the restocked level for ``removed``).
    level: int
    minimum: int
    device: str
    at: float


@dataclass(frozen=True, kw_only=True)
class ListItem:
    """An item on a list, as served by ``GET /lists/NAME`` and stored to survive restarts."""

    list_name: str
    item: str
    #: Lowest level among the devices that report it low.
    level: int
    minimum: int
    #: Device name -> its reported level, for every device that reports the item low.
    levels: dict[str, int]
    added_at: float
    updated_at: float


@dataclass
class _Entry:
    minimum: int
    added_at: float
    updated_at: float
    levels: dict[str, int] = field(default_factory=dict)


@dataclass
class ShoppingLists:
    """All shopping lists: list name -> item -> entry."""

    lists: dict[str, dict[str, _Entry]] = field(default_factory=dict)

    def report(
        self,
        *,
        list_name: str,
        item: str,
        device: str,
        level: int,
        minimum: int,
        at: float,
    ) -> ShoppingListChanged | None:
        """Take one device's stock level for an item; return the change it makes, if any."""
        items = self.lists.setdefault(list_name, {})
        entry = items.get(item)
        low = level < minimum
        action: ListAction
        if low:
            if entry is None:
                items[item] = _Entry(minimum=minimum, added_at=at, updated_at=at)
                items[item].levels[device] = level
                action = "added"
            elif entry.levels.get(device) == level and entry.minimum == minimum:
                return None
            else:
                entry.levels[device] = level
                entry.minimum = minimum
                entry.updated_at = at
                action = "updated"
        else:
            if entry is None or device not in entry.levels:
                return None
            del entry.levels[device]
            entry.updated_at = at
            if entry.levels:
                action = "updated"
            else:
                del items[item]
                action = "removed"
        if not items:
            del self.lists[list_name]
        return ShoppingListChanged(
            list_name=list_name,
            item=item,
            action=action,
            level=level,
            minimum=minimum,
            device=device,
            at=at,
        )

    def forget_device(self, device: str, at: float) -> list[ShoppingListChanged]:
        """Drop a device's reports (it was removed); items only it reported leave the lists."""
        changes: list[ShoppingListChanged] = []
        for list_name in sorted(self.lists):
            for item in sorted(self.lists[list_name]):
                entry = self.lists[list_name][item]
                if device in entry.levels:
                    change = self.report(
                        list_name=list_name,
                        item=item,
                        device=device,
                        level=entry.minimum,
                        minimum=entry.minimum,
                        at=at,
                    )
                    if change is not None:
                        changes.append(change)
        return changes

    def names(self) -> list[str]:
        """Names of the lists that have at least one item."""
        return sorted(self.lists)

    def items(self, list_name: str) -> list[ListItem]:
        """The items on one list, by item name; an unknown list is empty."""
        return [
            ListItem(
                list_name=list_name,
                item=item,
                level=min(entry.levels.values()),
                minimum=entry.minimum,
                levels=dict(entry.levels),
                added_at=entry.added_at,
                updated_at=entry.updated_at,
            )
            for item, entry in sorted(self.lists.get(list_name, {}).items())
        ]

    def all_items(self) -> list[ListItem]:
        return [item for name in self.names() for item in self.items(name)]

    def restore(self, items: Iterable[ListItem]) -> None:
        """Seed the lists from stored items (after a restart), replacing what was there."""
        self.lists.clear()
        for stored in items:
            if not stored.levels:
                continue
            self.lists.setdefault(stored.list_name, {})[stored.item] = _Entry(
                minimum=stored.minimum,
                added_at=stored.added_at,
                updated_at=stored.updated_at,
                levels=dict(stored.levels),
            )
