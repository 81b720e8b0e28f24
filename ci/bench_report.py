"""Turns a run of `cargo bench --bench switch` into the README's results section and an
SVG plot of commit latency against the number of rules in the chain (log-log)."""
import csv
import math
import platform
import re
import subprocess
import sys

text_path, csv_path, readme_path, svg_path = sys.argv[1:5]
text = open(text_path).read()
rows = [r for r in csv.DictReader(open(csv_path)) if r["where"] == "PREROUTING"]


def machine():
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {cores} cores, Linux {platform.release()}"


def plot():
    series = [("switcheroo commit", "ours_median_us", "#1f77b4"),
              ("switcheroo commit, record dir", "ours_recorded_median_us", "#9467bd"),
              ("iptables-nft binary, Go sequence", "iptables_median_us", "#d62728"),
              ("nft -f one batch", "nft_median_us", "#2ca02c")]
    w, h, left, bottom, top, right = 640, 400, 70, 50, 20, 20
    xs = [max(int(r["foreign_rules"]), 10) for r in rows]
    ys = [float(r[k]) for r in rows for _, k, _ in series if r[k]]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    X = lambda v: left + (math.log10(max(v, 10)) - x0) / (x1 - x0) * (w - left - right)
    Y = lambda v: h - bottom - (math.log10(v) - y0) / (y1 - y0) * (h - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for e in range(y0, y1 + 1):
        y = Y(10 ** e)
        label = f"{10 ** e / 1000:g} ms" if e >= 3 else f"{10 ** e:g} µs"
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for r in rows:
        n = int(r["foreign_rules"])
        out.append(f'<text x="{X(n):.1f}" y="{h - bottom + 18}" text-anchor="middle">{n:,}</text>')
    out.append(f'<text x="{(w + left) / 2}" y="{h - 10}" text-anchor="middle">foreign rules in PREROUTING (0 plotted at 10)</text>')
    for i, (name, key, color) in enumerate(series):
        pts = [(X(int(r["foreign_rules"])), Y(float(r[key]))) for r in rows if r[key]]
        if not pts:
            continue
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        out.append(f'<text x="{left + 10}" y="{top + 15 + 16 * i}" fill="{color}">{name} (median)</text>')
    out.append("</svg>")
    open(svg_path, "w").write("\n".join(out))


plot()
body = text[text.index("## commit latency"):].strip()
body = re.sub(r"^## ", "#### ", body, flags=re.M)
section = (f"<!-- bench:begin -->\nMeasured with `ci/bench-report` on {machine()}.\n\n"
           f"{body}\n\n![commit latency against chain size]({svg_path})\n<!-- bench:end -->")
readme = open(readme_path).read()
if "<!-- bench:begin -->" in readme:
    readme = re.sub(r"<!-- bench:begin -->.*<!-- bench:end -->", lambda _: section, readme, flags=re.S)
else:
    readme += "\n## Performance\n\n" + section + "\n"
open(readme_path, "w").write(readme)
print(f"wrote {svg_path} and the results section of {readme_path}")
