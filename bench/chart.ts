/**
 * A grouped bar chart as a standalone SVG (no library, no fonts beyond the viewer's sans-serif):
 * one group per label, one bar per series, values on a linear axis from 0, each bar labelled with
 * its value. Used by the workloads bench for "first response per application and link".
 */
export interface BarGroup {
  label: string;
  values: Record<string, number | undefined>;
}

const COLORS = ['#1f77b4', '#ff7f0e', '#7f7f7f', '#2ca02c', '#d62728'];
const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

export function groupedBarChart(title: string, unit: string, series: string[], groups: BarGroup[]): string {
  const barW = 26;
  const gap = 36;
  const groupW = series.length * barW + gap;
  const left = 60;
  const top = 40;
  const plotH = 260;
  // Wide enough for the title (about 7.5 px per character at 14 px) and the legend.
  const width = Math.max(left + Math.max(1, groups.length) * groupW + 20, left + title.length * 7.5, left + series.length * 110 + 20);
  const height = top + plotH + 70;
  const max = Math.max(1e-9, ...groups.flatMap((g) => series.map((s) => g.values[s] ?? 0)));
  const step = niceStep(max / 5);
  const top_ = Math.ceil(max / step) * step;
  const y = (v: number): number => top + plotH - (v / top_) * plotH;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${left}" y="20" font-size="14" font-weight="bold">${esc(title)}</text>`,
  ];
  for (let v = 0; v <= top_ + 1e-9; v += step) {
    out.push(`<line x1="${left}" x2="${width - 10}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`, `<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${fmt(v)}</text>`);
  }
  out.push(`<text x="14" y="${top + plotH / 2}" transform="rotate(-90 14 ${top + plotH / 2})" text-anchor="middle">${esc(unit)}</text>`);
  groups.forEach((g, gi) => {
    const x0 = left + gi * groupW + gap / 2;
    series.forEach((s, si) => {
      const v = g.values[s];
      if (v === undefined) return;
      const x = x0 + si * barW;
      out.push(
        `<rect x="${x}" y="${y(v)}" width="${barW - 2}" height="${top + plotH - y(v)}" fill="${COLORS[si % COLORS.length]}"><title>${esc(`${g.label} ${s}: ${fmt(v)} ${unit}`)}</title></rect>`,
        `<text x="${x + (barW - 2) / 2}" y="${y(v) - 3}" text-anchor="middle" font-size="9">${fmt(v)}</text>`,
      );
    });
    out.push(`<text x="${x0 + (series.length * barW) / 2}" y="${top + plotH + 16}" text-anchor="middle" font-size="10">${esc(g.label)}</text>`);
  });
  series.forEach((s, si) => {
    const x = left + si * 110;
    out.push(`<rect x="${x}" y="${height - 18}" width="10" height="10" fill="${COLORS[si % COLORS.length]}"/>`, `<text x="${x + 14}" y="${height - 9}">${esc(s)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

function niceStep(raw: number): number {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

function fmt(v: number): string {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}
