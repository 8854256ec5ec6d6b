// Colours from VS Code's theme (CSS variables on <body>), for charts in light, dark and high
// contrast themes, and a hook to redraw when the theme changes.

export function cssVar(name: string, fallback: string): string {
  const v = getComputedStyle(document.body).getPropertyValue(name).trim();
  return v || fallback;
}

export interface Theme {
  foreground: string;
  muted: string;
  grid: string;
  background: string;
  font: string;
  /** One colour per series: branches first, the fused kernel in `fused`. */
  series: string[];
  fused: string;
  highContrast: boolean;
}

export function theme(): Theme {
  const cls = document.body.classList;
  const highContrast = cls.contains('vscode-high-contrast') || cls.contains('vscode-high-contrast-light');
  return {
    foreground: cssVar('--vscode-editor-foreground', cssVar('--vscode-foreground', '#cccccc')),
    muted: cssVar('--vscode-descriptionForeground', '#999999'),
    grid: cssVar('--vscode-charts-lines', 'rgba(128,128,128,0.35)'),
    background: cssVar('--vscode-editor-background', '#1e1e1e'),
    font: cssVar('--vscode-font-family', 'sans-serif'),
    series: [
      cssVar('--vscode-charts-blue', '#3794ff'),
      cssVar('--vscode-charts-orange', '#d18616'),
      cssVar('--vscode-charts-green', '#89d185'),
      cssVar('--vscode-charts-purple', '#b180d7'),
      cssVar('--vscode-charts-yellow', '#cca700'),
      cssVar('--vscode-charts-red', '#f14c4c'),
    ],
    fused: cssVar('--vscode-charts-foreground', cssVar('--vscode-foreground', '#cccccc')),
    highContrast,
  };
}

/** `color` with an alpha (0…1); understands #rgb, #rrggbb, #rrggbbaa and rgb()/rgba(). */
export function withAlpha(color: string, alpha: number): string {
  const c = color.trim();
  let r: number, g: number, b: number;
  const hex = /^#([0-9a-f]{3,8})$/i.exec(c);
  if (hex) {
    const s = hex[1];
    const full = s.length <= 4 ? s.split('').map((x) => x + x).join('') : s;
    r = parseInt(full.slice(0, 2), 16);
    g = parseInt(full.slice(2, 4), 16);
    b = parseInt(full.slice(4, 6), 16);
  } else {
    const m = /rgba?\(\s*([\d.]+)[ ,]+([\d.]+)[ ,]+([\d.]+)/i.exec(c);
    if (!m) return c;
    [r, g, b] = [Number(m[1]), Number(m[2]), Number(m[3])];
  }
  return `rgba(${r}, ${g}, ${b}, ${Math.max(0, Math.min(1, alpha))})`;
}

/** Calls `redraw` when VS Code switches theme (it changes <body>'s class). */
export function onThemeChange(redraw: () => void): void {
  let last = document.body.className;
  new MutationObserver(() => {
    if (document.body.className === last) return;
    last = document.body.className;
    redraw();
  }).observe(document.body, { attributes: true, attributeFilter: ['class'] });
}
