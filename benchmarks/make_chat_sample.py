"""Write the shipped fine-tuning sample, mixtral_jax/finetune_data/chat_sample.jsonl (deterministic).

Three small skills a 20 M-parameter model can pick up in a few hundred LoRA steps, in the chat
format `mixtral-jax finetune` reads: adding two numbers, naming a country's capital, and writing a
one-line Python function. Usage: python benchmarks/make_chat_sample.py [OUT]
"""

import json
import os
import random
import sys

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "Iran": "Tehran",
            "India": "New Delhi", "China": "Beijing", "Russia": "Moscow", "Mexico": "Mexico City",
            "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Turkey": "Ankara",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires"}
FUNCTIONS = [("square", "x", "x * x", "the square of x"), ("double", "x", "2 * x", "twice x"),
             ("negate", "x", "-x", "minus x"), ("is_even", "n", "n % 2 == 0", "whether n is even"),
             ("first", "items", "items[0]", "the first item of a list"),
             ("last", "items", "items[-1]", "the last item of a list"),
             ("length", "items", "len(items)", "the length of a list"),
             ("total", "items", "sum(items)", "the sum of a list"),
             ("reverse", "s", "s[::-1]", "a string reversed"), ("upper", "s", "s.upper()", "a string in upper case"),
             ("cube", "x", "x ** 3", "the cube of x"), ("half", "x", "x / 2", "half of x"),
             ("increment", "x", "x + 1", "x plus one"), ("is_empty", "items", "len(items) == 0",
                                                          "whether a list is empty"),
             ("maximum", "items", "max(items)", "the largest item of a list"),
             ("minimum", "items", "min(items)", "the smallest item of a list")]
SYSTEM = "You are a concise assistant."


def examples(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(120):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}])
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Name the capital of {country}."):
            out.append([{"role": "user", "content": q},
                        {"role": "assistant", "content": f"The capital of {country} is {city}."}])
    for name, arg, body, what in FUNCTIONS:
        for q in (f"Write a Python function {name} that returns {what}.",
                  f"Python: define {name}({arg}), returning {what}."):
            out.append([{"role": "user", "content": q},
                        {"role": "assistant", "content": f"def {name}({arg}):\n    return {body}"}])
    rng.shuffle(out)
    for i in range(0, len(out), 5):  # some with a system prompt, as real data has
        out[i] = [{"role": "system", "content": SYSTEM}] + out[i]
    return [{"messages": m} for m in out]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "mixtral_jax", "finetune_data",
                                                              "chat_sample.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples(random.Random(0)):
            f.write(json.dumps(example) + "\n")
    print(path)


if __name__ == "__main__":
    main()
