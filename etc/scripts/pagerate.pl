#!/bin/sh
# pagerate.pl [SECONDS]: this host's paging rates, for vhostmd's PageRates group.
#
# Prints one line, "PageInRate,PageFaultRate", e.g. "400.000000,236.000000":
# KiB paged in per second (pgpgin) and page faults per second (pgfault) from
# /proc/vmstat, averaged over SECONDS (a whole number, default 1).
#
# Configs copied from the C vhostmd run "pagerate.pl" from
# /usr/share/vhostmd/scripts for a group of two uint64 variables, so this file
# keeps that name and output contract although it is sh and awk: nothing
# beyond a base Debian system is needed. Rates are whole numbers printed with a
# zero fraction, the shape C guests read with atoll and vhostmd publishes as
# integers. Errors are one line on stderr and a non-zero exit status, which
# vhostmd logs once and leaves the group out for.
set -u

VMSTAT=/proc/vmstat
interval=${1:-1}
case $interval in
    '' | *[!0-9]*)
        echo "pagerate.pl: '$interval' is not a whole number of seconds" >&2
        exit 2 ;;
esac
if [ "$interval" -eq 0 ]; then
    echo "pagerate.pl: the interval must be at least 1 second" >&2
    exit 2
fi

# Both counters of one read of $VMSTAT, or a failure if either is missing.
sample() {
    awk '$1 == "pgpgin" { pgin = $2 } $1 == "pgfault" { faults = $2 }
         END { if (pgin == "" || faults == "") exit 1; print pgin, faults }' "$VMSTAT" 2>/dev/null
}

first=$(sample) || { echo "pagerate.pl: cannot read pgpgin and pgfault from $VMSTAT" >&2; exit 1; }
sleep "$interval"
second=$(sample) || { echo "pagerate.pl: cannot read pgpgin and pgfault from $VMSTAT" >&2; exit 1; }

# Whole units per second (rounded down), never negative: the kernel's
# counters only grow, but a rate must not go below zero if one ever wraps.
echo "$first $second" | awk -v t="$interval" '{
    pgin = int(($3 - $1) / t); faults = int(($4 - $2) / t)
    if (pgin < 0) pgin = 0
    if (faults < 0) faults = 0
    printf "%.6f,%.6f\n", pgin, faults
}'
