import { CorralError } from '../common/errors.ts';
import type { NodeInfo } from './node-info.ts';

/**
 * Where a volume's replicas go: one per node, on nodes that are up, not
 * cordoned and have room, the most free space first — this node first when
 * it qualifies, so that the engine has a replica next to it. Pure: the
 * caller brings the nodes (`Cluster.nodes()`, this node first), so a
 * placement decision costs no I/O of its own.
 */
export function placeReplicas(input: {
  volume: string;
  sizeBytes: number;
  count: number;
  /** Every node this one knows, itself first. */
  nodes: NodeInfo[];
  /** Nodes (by URL) that hold a replica of the volume already. */
  exclude?: Set<string>;
  /** Whether this node must be one of them (the `--peer` mode keeps its first replica here). */
  selfRequired: boolean;
  /** Fewer nodes than `count` will do (the caller puts the rest on this node, as asked). */
  allowFewer?: boolean;
  /** Said at the end of the error. */
  hint?: string;
}): NodeInfo[] {
  const { nodes, count, sizeBytes, exclude } = input;
  const fits = (n: NodeInfo) =>
    n.state === 'up' && !n.cordoned && n.freeBytes >= sizeBytes && !exclude?.has(n.url);
  const [self, ...others] = nodes;
  const eligible = others.filter(fits).sort((a, b) => b.freeBytes - a.freeBytes);
  const chosen = [...(self && fits(self) ? [self] : []), ...eligible].slice(0, count);
  if (
    (input.selfRequired && (!self || !fits(self))) ||
    chosen.length === 0 ||
    (chosen.length < count && !input.allowFewer)
  ) {
    const why = nodes
      .map((n) =>
        n.state !== 'up'
          ? `${n.name ?? n.url} is down`
          : n.cordoned
            ? `${n.name ?? n.url} is cordoned`
            : exclude?.has(n.url)
              ? `${n.name ?? n.url} has one already`
              : `${n.name ?? n.url} has ${n.freeBytes} bytes free`,
      )
      .join('; ');
    throw new CorralError(
      'LIMIT_REACHED',
      `Cannot place ${count} replica${count === 1 ? '' : 's'} of volume ${input.volume} (${sizeBytes} bytes) on distinct hosts: ${chosen.length} of ${Math.max(nodes.length, 1)} can take one${why ? ` (${why})` : ''}${input.hint ?? ''}`,
    );
  }
  return chosen;
}
