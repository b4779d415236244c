"""`tau`: a tau-bench-style stateful API domain: a small orders database behind a few tools.

The episode's database is a private copy of `db` (env kwargs; {"orders": {order_id: {...}}}). The tools read and
change it. The reward compares the final database with the one obtained by replaying the gold write actions
(reward_model.ground_truth: [{"name": ..., "arguments": {...}}, ...]) on a fresh copy, as tau-bench does:
1.0 when they are equal, else 0.0 — any route to the right state counts; a wrong or extra change does not.
"""
from __future__ import annotations

import copy
import json

from envs.base import ToolEnv, as_dict
from envs.tools import tool


class OrdersAPI:
    """The domain's state and its operations; the env's tools and the gold replay both go through it."""

    def __init__(self, db: dict):
        self.db = copy.deepcopy(db)

    def find_orders(self, user: str) -> str:
        # One short line per order ("o29 fan pending"): a tiny model reads it more easily than a JSON list.
        found = [f"{oid} {o['item']} {o['status']}" for oid, o in sorted(self.db["orders"].items()) if o["user"] == user]
        return "\n".join(found) if found else f"No orders for user {user!r}."

    def get_order(self, order_id: str) -> str:
        order = self.db["orders"].get(order_id)
        return json.dumps({"order_id": order_id, **order}) if order else f"No order {order_id!r}."

    def cancel_order(self, order_id: str) -> str:
        order = self.db["orders"].get(order_id)
        if order is None:
            return f"No order {order_id!r}."
        if order["status"] != "pending":
            return f"Order {order_id} is {order['status']} and cannot be cancelled."
        order["status"] = "cancelled"
        return f"Order {order_id} cancelled."

    def change_address(self, order_id: str, address: str) -> str:
        order = self.db["orders"].get(order_id)
        if order is None:
            return f"No order {order_id!r}."
        if order["status"] != "pending":
            return f"Order {order_id} is {order['status']}; its address cannot change."
        order["address"] = address
        return f"Order {order_id} will go to {address}."

    def apply(self, action: dict) -> str:
        return getattr(self, action["name"])(**action["arguments"])


def tau_reward(initial_db: dict, gold_actions: list[dict], final_db: dict) -> float:
    """1.0 when final_db equals initial_db with the gold actions replayed, else 0.0."""
    gold = OrdersAPI(initial_db)
    for action in gold_actions:
        gold.apply(action)
    return float(gold.db == final_db)


class TauEnv(ToolEnv):
    def __init__(self, row: dict, *, db: dict | str, **kwargs):
        """db: the initial database, or its JSON text (rows keep it as text: one column type across rows)."""
        super().__init__(row, **kwargs)
        self.initial_db = copy.deepcopy(as_dict(db))
        self.api = OrdersAPI(self.initial_db)

    @tool
    def find_orders(self, user: str) -> str:
        """List a user's orders (id, item, status).

        Args:
            user: the user's name
        """
        return self.api.find_orders(user)

    @tool
    def get_order(self, order_id: str) -> str:
        """One order's details.

        Args:
            order_id: the order's id
        """
        return self.api.get_order(order_id)

    @tool
    def cancel_order(self, order_id: str) -> str:
        """Cancel a pending order.

        Args:
            order_id: the order's id
        """
        return self.api.cancel_order(order_id)

    @tool
    def change_address(self, order_id: str, address: str) -> str:
        """Change where a pending order is sent.

        Args:
            order_id: the order's id
            address: the new address
        """
        return self.api.change_address(order_id, address)

    def final_reward(self, answer: str) -> float:
        return tau_reward(self.initial_db, as_dict(self.row["reward_model"]["ground_truth"]), self.api.db)
