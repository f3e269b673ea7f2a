"""Parses Prometheus/OpenMetrics exposition text from stdin with the Prometheus project's own Python parser
and prints {sample name: [[labels, value], ...]} as JSON. A parse error exits non-zero with the reason."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
