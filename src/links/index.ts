/** Emulated edge links (docs/links.md). */
export { checkLinkTools, LINKS_DIR, openLink, removeStaleLinks, type DirectionStats, type Link, type LinkStats } from './link';
export { measureLink, type LinkMeasurement, type MeasureOptions } from './measure';
export {
  LINK_PROFILES,
  parseLinkProfile,
  relayBufferBytes,
  tbfArgs,
  tbfParams,
  type LinkProfile,
  type LinkProfileInput,
  type LinkProfileName,
  type OpenLinkOptions,
  type TbfParams,
} from './profiles';
export { startDeviceNetwork, type ClusterPath, type DeviceNetwork } from './device-network';
