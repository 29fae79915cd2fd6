#!/usr/bin/env python3
"""Builds the sample region's SYNTHETIC underground-pipeline tables.

Nothing here is real infrastructure: pipe numbers, roads, sizes and dates are drawn
from a fixed seed so that every checkout has the same files. Hangzhou keeps its
pipelines in three departments' PostgreSQL databases (water, gas, power), each with
its own table layout and codes; Suzhou publishes one CSV file.

    python3 scripts/build_pipelines_data.py   # writes federation-configs/demo/data/...
"""
import csv
import datetime
import os
import random

ROOT = os.path.join(os.path.dirname(__file__), "..", "federation-configs", "demo", "data")
rng = random.Random(20261128)

HZ = {  # code: name
    "330102": "上城区", "330105": "拱墅区", "330106": "西湖区",
    "330108": "滨江区", "330109": "萧山区", "330110": "余杭区",
}
HZ_OLD = {"330102": "江干区", "330105": "下城区"}  # abolished names the power company still uses
SZ = {"320505": "虎丘区", "320506": "吴中区", "320507": "相城区", "320508": "姑苏区", "320583": "昆山市"}
ROADS = ["文一路", "天目山路", "延安路", "解放路", "江南大道", "学院路", "古墩路", "湖墅南路",
         "人民路", "干将路", "苏州大道", "星湖街", "东环路", "金鸡湖大道"]


def day(lo=1985, hi=2025):
    start = datetime.date(lo, 1, 1)
    return start + datetime.timedelta(days=rng.randrange((datetime.date(hi, 12, 31) - start).days))


def write(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def main():
    hz = os.path.join(ROOT, "hangzhou", "pipelines")
    codes = list(HZ)
    write(os.path.join(hz, "water_mains.csv"),
          ["pipe_no", "district_code", "road", "diameter_mm", "material", "length_m", "laid_on", "depth_m", "status_code"],
          [[f"WS-{i:06d}", rng.choice(codes), rng.choice(ROADS[:8]), rng.choice([100, 150, 200, 300, 600, 1200]),
            rng.choice(["DIP", "PE", "PCCP"]), round(rng.uniform(20, 800), 1), day().isoformat(),
            f"{rng.uniform(0.8, 4.5):.2f}", rng.choice("1111111110")] for i in range(1200)])
    write(os.path.join(hz, "gas_lines.csv"),
          ["id", "qx_dm", "street", "dn", "pressure", "length_m", "laid_on", "state", "inspected_at"],
          [[700000 + i, rng.choice(codes), rng.choice(ROADS[:8]), rng.choice([63, 110, 160, 250, 315]),
            rng.choice(["中压", "低压"]), round(rng.uniform(10, 500), 1), day(1995).isoformat(),
            rng.choice(["运行"] * 9 + ["停运"]),
            f"2026-{rng.randint(1, 10):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00+08"]
           for i in range(800)])
    names = [HZ_OLD.get(c, HZ[c]) if rng.random() < 0.3 else HZ[c] for c in codes]
    write(os.path.join(hz, "cable_ducts.csv"),
          ["duct_id", "area", "road_name", "voltage_kv", "duct_width_mm", "length_m", "commissioned", "retired"],
          [[f"DL{i:05d}", rng.choice(names), rng.choice(ROADS[:8]), rng.choice(["10.0", "20.0", "110.0", "220.0"]),
            rng.choice([150, 200, 400, 800]), round(rng.uniform(30, 1500), 1), day(2000).isoformat(),
            rng.choice(["f"] * 19 + ["t"])] for i in range(600)])
    write(os.path.join(ROOT, "suzhou", "pipelines.csv"),
          ["管线编号", "权属单位", "区县代码", "道路", "管径", "长度米", "敷设日期", "状态"],
          [[f"SZ{i:06d}", rng.choice(["自来水公司", "燃气集团", "供电公司"]), rng.choice(list(SZ)),
            rng.choice(ROADS[8:]), rng.choice([100, 160, 200, 300, 500]), f"{rng.uniform(15, 900):.1f}",
            day().strftime("%Y%m%d"), rng.choice(["在用"] * 9 + ["废弃"])] for i in range(900)])


if __name__ == "__main__":
    main()
