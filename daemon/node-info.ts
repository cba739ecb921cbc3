import type { DiskInfo } from './disks.ts';

/** A node as `node ls` shows it: this node, a `--peer`, or a node of the cluster. */
export interface NodeInfo {
  id: string;
  /** In a cluster: the node's name (`--node-name`). */
  name?: string;
  url: string;
  state: 'up' | 'down';
  totalBytes: number;
  freeBytes: number;
  replicas: number;
  /** Its disks for replicas: path, tags, space, replicas, state. */
  disks?: DiskInfo[];
  version?: string;
  /** In a cluster: takes no new replicas or engines. */
  cordoned?: boolean;
  /** In a cluster, this node only: requests it made to etcd since it started (watches count once). */
  etcdRequests?: number;
  error?: string;
}
