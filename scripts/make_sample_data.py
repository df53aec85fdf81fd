"""Write data/products.csv: synthetic product offers written by this project.

Each product (group) gets several merchant-style offer titles: reordered words,
abbreviations, extra attributes, colour and merchant noise. Categories are the labels.
Deterministic: `python scripts/make_sample_data.py` rewrites the same file.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

CATEGORIES = {
    "Mobile Phones": (["apple", "samsung", "google", "motorola", "nokia", "sony"],
                      ["iphone", "galaxy", "pixel", "moto", "xperia", "edge"],
                      ["64gb", "128gb", "256gb", "512gb"], ["5g", "4g", "dual sim", "unlocked", "sim free"]),
    "TVs": (["lg", "samsung", "sony", "panasonic", "philips", "hisense"],
            ["oled", "qled", "nanocell", "bravia", "ambilight", "uled"],
            ["43", "50", "55", "65", "75"], ["4k uhd", "8k", "hdr", "smart tv", "hdmi 2.1"]),
    "Washing Machines": (["bosch", "miele", "hotpoint", "beko", "indesit", "aeg"],
                         ["serie 6", "w1", "nswm", "wtk", "iwc", "lavamat"],
                         ["7kg", "8kg", "9kg", "10kg"], ["1400 rpm", "1600 rpm", "a+++", "freestanding", "integrated"]),
    "Fridge Freezers": (["bosch", "samsung", "lg", "hotpoint", "beko", "liebherr"],
                        ["kgn", "rb", "gbb", "h7t", "cfg", "cnef"],
                        ["60cm", "70cm", "55cm"], ["frost free", "no frost", "70/30", "50/50", "american style"]),
    "CPUs": (["intel", "amd"], ["core i5", "core i7", "core i9", "ryzen 5", "ryzen 7", "ryzen 9"],
             ["3.6ghz", "4.2ghz", "3.0ghz", "3.8ghz"], ["box", "tray", "socket am4", "lga1700", "8 core", "6 core"]),
    "Digital Cameras": (["canon", "nikon", "sony", "fujifilm", "panasonic", "olympus"],
                        ["eos", "z", "alpha", "x-t", "lumix", "om-d"],
                        ["24mp", "20mp", "45mp", "26mp"], ["body only", "kit lens", "mirrorless", "dslr", "4k video"]),
    "Microwaves": (["panasonic", "samsung", "sharp", "bosch", "russell hobbs", "daewoo"],
                   ["nn", "mc", "r", "hmt", "rhm", "kor"],
                   ["20l", "23l", "25l", "32l"], ["800w", "900w", "1000w", "grill", "combination", "solo"]),
    "Dishwashers": (["bosch", "miele", "beko", "hotpoint", "neff", "siemens"],
                    ["sms", "g 7000", "din", "hfc", "s513", "sn"],
                    ["60cm", "45cm"], ["12 place", "13 place", "14 place", "integrated", "freestanding", "slimline"]),
}
# Merchants usually name the product type, in several ways.
NOUNS = {
    "Mobile Phones": ["smartphone", "mobile phone", "phone", "handset"],
    "TVs": ["tv", "television", "smart tv", "led tv"],
    "Washing Machines": ["washing machine", "washer", "front loader"],
    "Fridge Freezers": ["fridge freezer", "fridge-freezer", "combi fridge"],
    "CPUs": ["processor", "cpu", "desktop processor"],
    "Digital Cameras": ["camera", "digital camera", "system camera"],
    "Microwaves": ["microwave", "microwave oven", "combi microwave"],
    "Dishwashers": ["dishwasher", "dish washer", "built-in dishwasher"],
}
CODE_PREFIX = {
    "Mobile Phones": ["sm-g", "sm-a", "xt", "ta-", "a2"], "TVs": ["qe", "oled", "kd-", "ue", "tx-"],
    "Washing Machines": ["ww", "wan", "wm", "nswm", "wtk"], "Fridge Freezers": ["rb", "kgn", "gbb", "cfg", "cnef"],
    "CPUs": ["i5-", "i7-", "i9-", "r5-", "r7-"], "Digital Cameras": ["eos-", "z", "ilce-", "x-t", "dc-"],
    "Microwaves": ["nn-", "mc", "r-", "hmt", "kor"], "Dishwashers": ["sms", "smv", "din", "hfc", "sn"],
}
COLOURS = ["black", "white", "silver", "grey", "stainless steel", "graphite", "blue", "gold"]
NOISE = ["new", "uk", "2023", "official", "free delivery", "warranty", "best price", "in stock"]


def product(rng: random.Random, cat: str, pid: int) -> dict:
    brands, lines, sizes, extras = CATEGORIES[cat]
    return {"id": pid, "category": cat, "brand": rng.choice(brands), "line": rng.choice(lines),
            # Real model codes carry the product type in their prefix (QE55.. TVs, WW90.. washers).
            "model": f"{rng.choice(CODE_PREFIX[cat])}{rng.randint(10, 9999)}{rng.choice(['', 'x', 'n', 'gb', 'pro'])}",
            "size": rng.choice(sizes), "extras": rng.sample(extras, 2), "colour": rng.choice(COLOURS)}


def offer(rng: random.Random, p: dict) -> str:
    words = [p["brand"], p["line"], p["model"], p["size"]]
    if rng.random() < 0.6:
        words.append(p["colour"])
    words += rng.sample(p["extras"], rng.randint(0, 2))
    if rng.random() < 0.3:
        words.append(rng.choice(NOISE))
    if rng.random() < 0.7:
        words.append(rng.choice(NOUNS[p["category"]]))
    if rng.random() < 0.3:  # merchants drop the brand or the product line
        words.remove(rng.choice([p["brand"], p["line"]]))
    head, tail = words[:2], words[2:]
    rng.shuffle(tail)
    title = " ".join(head + tail)
    if rng.random() < 0.2:
        title = title.replace(" ", "-", 1)
    return title


def main(out: Path = Path(__file__).resolve().parents[1] / "data" / "products.csv", n_products: int = 400) -> None:
    rng = random.Random(7)
    rows, seen = [], set()
    for pid in range(1, n_products + 1):
        p = product(rng, rng.choice(sorted(CATEGORIES)), pid)
        for _ in range(rng.choice([1, 2, 3, 3, 4, 5])):
            t = offer(rng, p)
            if t not in seen:  # exact duplicate titles are dropped, as a clean sample should be
                seen.add(t)
                rows.append((t, pid, p["category"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "product_id", "category"])
        w.writerows(rows)
    print(f"wrote {len(rows)} offers of {n_products} products to {out}")


if __name__ == "__main__":
    main()
