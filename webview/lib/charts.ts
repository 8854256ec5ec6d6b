// Chart.js (with the matrix controller for heatmaps), themed from VS Code's colours. Every chart
// is created through here so a theme change can destroy and redraw them all.
import {
  BarController,
  BarElement,
  CategoryScale,
  Chart,
  type ChartConfiguration,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from 'chart.js';
import { MatrixController, MatrixElement } from 'chartjs-chart-matrix';
import type { Heatmap, Histogram } from '../../src/core/stats';
import { fmtNum } from '../../src/extension/view/format';
import { type Theme, theme, withAlpha } from './theme';

Chart.register(BarController, BarElement, CategoryScale, LinearScale, LineController, LineElement, PointElement, Tooltip, Legend, MatrixController, MatrixElement);

const live = new Set<Chart>();
let t: Theme | undefined;

/** Re-reads the theme's colours into Chart.js's defaults. */
export function applyTheme(): Theme {
  t = theme();
  Chart.defaults.color = t.foreground;
  Chart.defaults.borderColor = t.grid;
  Chart.defaults.font.family = t.font;
  Chart.defaults.font.size = 11;
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.plugins.legend.labels.boxWidth = 10;
  Chart.defaults.plugins.tooltip.backgroundColor = withAlpha(t.background, 0.95);
  Chart.defaults.plugins.tooltip.titleColor = t.foreground;
  Chart.defaults.plugins.tooltip.bodyColor = t.foreground;
  Chart.defaults.plugins.tooltip.borderColor = t.grid;
  Chart.defaults.plugins.tooltip.borderWidth = 1;
  return t;
}

export function currentTheme(): Theme {
  return t ?? applyTheme();
}

export function destroyCharts(): void {
  for (const c of live) c.destroy();
  live.clear();
}

function make<T extends 'bar' | 'line' | 'matrix'>(canvas: HTMLCanvasElement, config: ChartConfiguration<T>): Chart<T> {
  const chart = new Chart(canvas, config);
  live.add(chart as unknown as Chart);
  return chart;
}

const axisTitle = (text: string) => ({ display: !!text, text, color: currentTheme().muted });

/** Histogram as touching bars; the x labels are bin centres. */
export function histogramChart(canvas: HTMLCanvasElement, hist: Histogram, label: string, color: string): Chart<'bar'> {
  const bins = hist.counts.length;
  const w = (hist.hi - hist.lo) / bins;
  const centres = hist.counts.map((_, i) => hist.lo + (i + 0.5) * w);
  return make(canvas, {
    type: 'bar',
    data: {
      labels: centres.map((c) => fmtNum(c)),
      datasets: [{ label, data: hist.counts, backgroundColor: withAlpha(color, 0.75), borderColor: color, borderWidth: currentTheme().highContrast ? 1 : 0, barPercentage: 1, categoryPercentage: 1 }],
    },
    options: {
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { title: (items) => `${fmtNum(hist.lo + items[0].dataIndex * w)} … ${fmtNum(hist.lo + (items[0].dataIndex + 1) * w)}` } },
      },
      scales: {
        x: { ticks: { maxTicksLimit: 5, maxRotation: 0 }, grid: { display: false }, title: axisTitle('weight') },
        y: { beginAtZero: true, ticks: { maxTicksLimit: 4 }, title: axisTitle('count') },
      },
    },
  });
}

export interface Series {
  label: string;
  values: number[];
  color: string;
  dashed?: boolean;
}

/** Values per channel (x = channel index), one line per series. */
export function channelChart(canvas: HTMLCanvasElement, series: Series[], yLabel: string, opts: { log?: boolean } = {}): Chart<'line'> {
  const n = Math.max(0, ...series.map((s) => s.values.length));
  return make(canvas, {
    type: 'line',
    data: {
      labels: Array.from({ length: n }, (_, i) => i),
      datasets: series.map((s) => ({
        label: s.label,
        data: s.values,
        borderColor: s.color,
        backgroundColor: s.color,
        borderWidth: 1.5,
        borderDash: s.dashed ? [4, 3] : undefined,
        pointRadius: n <= 64 ? 1.5 : 0,
        tension: 0,
      })),
    },
    options: {
      interaction: { mode: 'index', intersect: false },
      plugins: { legend: { display: series.length > 1, position: 'bottom' }, tooltip: { callbacks: { title: (items) => `channel ${items[0].label}`, label: (i) => `${i.dataset.label}: ${fmtNum(i.parsed.y ?? 0)}` } } },
      scales: {
        x: { type: 'category', ticks: { maxTicksLimit: 9, maxRotation: 0 }, grid: { display: false }, title: axisTitle('output channel') },
        y: { type: 'linear', beginAtZero: !opts.log, ticks: { maxTicksLimit: 5, callback: (v) => fmtNum(Number(v)) }, title: axisTitle(yLabel) },
      },
    },
  });
}

/** Horizontal bars: one group per label, one bar per dataset (branch shares). */
export function shareChart(canvas: HTMLCanvasElement, labels: string[], datasets: { label: string; values: number[]; colors: string[] }[]): Chart<'bar'> {
  return make(canvas, {
    type: 'bar',
    data: {
      labels,
      // The first dataset solid, the next ones lighter, so the legend tells them apart.
      datasets: datasets.map((d, di) => ({ label: d.label, data: d.values.map((v) => v * 100), backgroundColor: d.colors.map((c) => withAlpha(c, di === 0 ? 0.85 : 0.3)), borderColor: d.colors, borderWidth: 1 })),
    },
    options: {
      indexAxis: 'y',
      plugins: { legend: { display: datasets.length > 1, position: 'bottom' }, tooltip: { callbacks: { label: (i) => `${i.dataset.label}: ${fmtNum(i.parsed.x ?? 0)}%` } } },
      scales: { x: { ticks: { callback: (v) => `${v}%` }, title: axisTitle('share of the fused kernel') }, y: { grid: { display: false } } },
    },
  });
}

/** A k×k heatmap of Σ|W| per spatial position; `max` shares one colour scale across charts. */
export function heatmapChart(canvas: HTMLCanvasElement, heat: Heatmap, max: number, color: string, label: string): Chart<'matrix'> {
  const data = heat.values.map((v, i) => ({ x: i % heat.cols, y: Math.floor(i / heat.cols), v }));
  const th = currentTheme();
  return make(canvas, {
    type: 'matrix',
    data: {
      datasets: [
        {
          label,
          data,
          backgroundColor: (ctx) => {
            const v = (ctx.raw as { v: number } | undefined)?.v ?? 0;
            return withAlpha(color, max > 0 ? 0.06 + 0.94 * (v / max) : 0.06);
          },
          borderColor: th.highContrast ? th.foreground : withAlpha(th.foreground, 0.15),
          borderWidth: 1,
          width: ({ chart }) => (chart.chartArea?.width ?? 0) / heat.cols - 2,
          height: ({ chart }) => (chart.chartArea?.height ?? 0) / heat.rows - 2,
        },
      ],
    },
    options: {
      plugins: {
        legend: { display: false },
        tooltip: {
          callbacks: {
            title: () => label,
            label: (ctx) => {
              const p = ctx.raw as { x: number; y: number; v: number };
              return `row ${p.y}, col ${p.x}: Σ|w| = ${fmtNum(p.v)}${max > 0 ? ` (${((100 * p.v) / max).toFixed(0)}% of max)` : ''}`;
            },
          },
        },
      },
      scales: {
        x: { type: 'linear', min: -0.5, max: heat.cols - 0.5, offset: false, ticks: { stepSize: 1, callback: (v) => (Number.isInteger(v) ? String(v) : '') }, grid: { display: false } },
        y: { type: 'linear', min: -0.5, max: heat.rows - 0.5, reverse: true, offset: false, ticks: { stepSize: 1, callback: (v) => (Number.isInteger(v) ? String(v) : '') }, grid: { display: false } },
      },
    },
  });
}
