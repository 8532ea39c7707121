/** Small helpers shared by the benchmarks. */

/** The number of runs: `--runs N`, else $BENCH_RUNS, else 3. */
export function argRuns(): number {
  const i = process.argv.indexOf('--runs');
  const v = i >= 0 ? Number(process.argv[i + 1]) : Number(process.env.BENCH_RUNS ?? 3);
  if (!Number.isInteger(v) || v < 1) throw new Error('--runs needs a positive integer');
  return v;
}

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
};
