"""The federated dataset protocol: user ids and each user's data.

dpfl's simulation layer never looks inside a user's data: it fetches it with
[`FederatedDataset.user_data`][dpfl.simulation.FederatedDataset.user_data] and hands it to the local
trainer, whose ``loss_fn`` consumes each batch. Any object with ``user_ids()`` and
``user_data(user_id)`` is a federated dataset (structural typing);
[`InMemoryFederatedDataset`][dpfl.simulation.InMemoryFederatedDataset] is a ready-made one over a
mapping.

References:
    Pelikan et al., arXiv 2310.00098, section 2 (user-level DP: the unit of privacy is a user).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["FederatedDataset", "InMemoryFederatedDataset"]


@runtime_checkable
class FederatedDataset(Protocol):
    """Anything that maps user ids to that user's data.

    For user-level DP, ``user_data(u)`` must return *all* the data of user ``u`` and nothing of any
    other user: the clipping bound then limits the influence of one person, not of one example.
    """

    def user_ids(self) -> Sequence[Hashable]:
        """Return the ids of all users (the sampling population), without duplicates."""
        ...

    def user_data(self, user_id: Hashable) -> Any:
        """Return the data of ``user_id``: usually a sequence of batches for ``loss_fn``.

        Args:
            user_id: One of [`user_ids`][dpfl.simulation.FederatedDataset.user_ids].
        """
        ...


class InMemoryFederatedDataset:
    """A [`FederatedDataset`][dpfl.simulation.FederatedDataset] over an in-memory mapping ``user id
    -> batches``.

    Args:
        data: Mapping from user id to that user's data (typically a list of batches, each batch
            whatever ``loss_fn(model, batch)`` consumes). The mapping is copied shallowly.

    Raises:
        TypeError: If ``data`` is not a mapping.
        ValueError: If ``data`` is empty.

    Examples:
        >>> import torch
        >>> ds = InMemoryFederatedDataset({"alice": [(torch.zeros(4, 3), torch.zeros(4))]})
        >>> list(ds.user_ids())
        ['alice']
        >>> len(ds.user_data("alice"))
        1
    """

    def __init__(self, data: Mapping[Hashable, Any]) -> None:
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping user id -> data, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("data must contain at least one user, got an empty mapping")
        self._data = dict(data)
        self._ids = tuple(self._data)

    def user_ids(self) -> Sequence[Hashable]:
        """Return the user ids, in the mapping's insertion order."""
        return self._ids

    def user_data(self, user_id: Hashable) -> Any:
        """Return the data of ``user_id``.

        Args:
            user_id: One of the mapping's keys.

        Raises:
            KeyError: If ``user_id`` is not in the dataset (the message names it).
        """
        try:
            return self._data[user_id]
        except KeyError:
            raise KeyError(f"user {user_id!r} is not in this federated dataset") from None

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._ids)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._data

    def __repr__(self) -> str:
        return f"InMemoryFederatedDataset(num_users={len(self._ids)})"
