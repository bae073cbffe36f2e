import json
import os


class Inventory:
    """A small in-memory inventory of items and their counts."""

    def __init__(self, path=None):
        self.path = path
        self.items = {}
        if path and os.path.exists(path):
            self.load()

    def add(self, name, count=1):
        if count < 0:
            raise ValueError("count must not be negative")
        self.items[name] = self.items.get(name, 0) + count
        return self.items[name]

    def remove(self, name, count=1):
        if name not in self.items:
            raise KeyError(name)
        self.items[name] -= count
        if self.items[name] <= 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())

    def load(self):
        with open(self.path) as f:
            self.items = json.load(f)

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.items, f, indent=2)


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n):
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True


if __name__ == "__main__":
    inventory = Inventory()
    inventory.add("apple", 3)
    inventory.add("pear")
    print(inventory.total())
    print([fibonacci(i) for i in range(10)])
    print([n for n in range(30) if is_prime(n)])
