#!/usr/bin/env python3
"""Builds the operator console's offline basemap (src/net/http/console_basemap.json) from the npm
package `world-atlas` (Natural Earth 1:110m, TopoJSON).

Run once by hand, never by the build (the build has no network): fetch the package, unpack it and
point this script at its `countries-110m.json`:

    npm pack world-atlas@2 && tar xzf world-atlas-2.0.2.tgz
    python3 tools/basemap.py package/countries-110m.json > src/net/http/console_basemap.json

Output (one line of JSON, ASCII only, no backslash, quote-free strings): {"v":1,"q":Q,"land":[..],
"borders":[..]} where every string is one ring (land: the merged land polygons' rings, exterior
and holes, drawn with the even-odd rule) or one line (borders: the arcs two different countries
share, i.e. land borders, without coastlines). A string encodes the positions as integers in units
of 1/Q degree, lon then lat, the first position absolute and the rest as deltas; each integer is
zigzag-mapped to >= 0 and written as 5-bit groups, least significant first, the sixth bit set on
every group but the last, each group as one character of the base64url alphabet (the scheme of
Google's encoded polylines with an alphabet safe in JSON, JavaScript and HTML). Longitudes are
continuous along a ring, so a ring crossing the antimeridian reaches past 180 (at most 360 in
magnitude). Positions that round to the previous one are dropped. Deterministic: the same input
gives the same bytes.
"""

import json
import sys

Q = 50  # units per degree: 0.02 deg, about 2 km, finer than the 1:110m source (~0.1 deg)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def decode_arcs(topo):
    """The topology's arcs as lists of absolute [lon, lat] (quantized TopoJSON is delta-coded)."""
    sx, sy = topo["transform"]["scale"]
    tx, ty = topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x += dx
            y += dy
            pts.append((x * sx + tx, y * sy + ty))
        arcs.append(pts)
    return arcs


def arc_points(arcs, index):
    """Arc `index` (negative: ~index reversed)."""
    return arcs[index] if index >= 0 else list(reversed(arcs[~index]))


def ring_points(arcs, ring):
    """A ring from its arc indexes; consecutive arcs share their joining position."""
    pts = []
    for k, index in enumerate(ring):
        a = arc_points(arcs, index)
        pts.extend(a if k == 0 else a[1:])
    return unwrap(pts)


def unwrap(pts):
    """The positions with longitudes made continuous: a ring that crosses the antimeridian
    (Russia's with Chukotka, Fiji's) jumps from 180 to -180 in the source, which a flat map would
    draw as a sliver across the whole world; here it goes on past 180 instead (the page draws
    the basemap once per 360 degrees shown, so the part past 180 shows at -180 too)."""
    out = []
    shift = 0.0
    for lon, lat in pts:
        if out:
            prev = out[-1][0]
            while lon + shift - prev > 180:
                shift -= 360
            while lon + shift - prev < -180:
                shift += 360
        out.append((lon + shift, lat))
    return out


def polygons(geometry):
    if geometry["type"] == "Polygon":
        return [geometry["arcs"]]
    if geometry["type"] == "MultiPolygon":
        return geometry["arcs"]
    return []


def zigzag(n):
    return (n << 1) if n >= 0 else ((-n << 1) - 1)


def encode(points):
    """The string of one ring or line (see the module docstring); None if under two positions."""
    out = []
    prev = None
    count = 0
    for lon, lat in points:
        q = (round(lon * Q), round(lat * Q))
        if q == prev:
            continue
        d = q if prev is None else (q[0] - prev[0], q[1] - prev[1])
        prev = q
        count += 1
        for v in d:
            v = zigzag(v)
            while v >= 32:
                out.append(ALPHABET[32 | (v & 31)])
                v >>= 5
            out.append(ALPHABET[v])
    return "".join(out) if count >= 2 else None


def main():
    topo = json.load(open(sys.argv[1]))
    arcs = decode_arcs(topo)
    land = []
    for geometry in topo["objects"]["land"]["geometries"]:
        for polygon in polygons(geometry):
            for ring in polygon:
                s = encode(ring_points(arcs, ring))
                if s is not None and len(s) > 6:  # rings of 3 positions or fewer are specks
                    land.append(s)
    # Borders: arcs used by two different countries (coastlines are used by one).
    users = {}
    for k, geometry in enumerate(topo["objects"]["countries"]["geometries"]):
        for polygon in polygons(geometry):
            for ring in polygon:
                for index in ring:
                    users.setdefault(index if index >= 0 else ~index, set()).add(k)
    borders = []
    for index in sorted(users):
        if len(users[index]) >= 2:
            s = encode(arcs[index])
            if s is not None:
                borders.append(s)
    out = {"v": 1, "q": Q, "land": land, "borders": borders}
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
