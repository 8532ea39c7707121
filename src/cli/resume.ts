/**
 * `synthesize --resume`: restore the synthesized VM under libvirt through the hypervisor adapter
 * (the CLI may import it; the core may not). Loaded on demand, so file-only commands never load
 * the libvirt binding.
 */
import type { ResumeResult } from './backend';

export interface ResumeInput {
  diskPath: string;
  savePath: string;
  serialPath: string;
  /** The launch VM's CPU model (from the overlay meta), checked before resuming. */
  cpuModel: string | undefined;
  forwardGuestPort?: number;
}

export type Resumer = (input: ResumeInput) => Promise<ResumeResult>;
