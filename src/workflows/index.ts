// Every workflow the workers register. Workflows import activity *types* only.
export { guestSelfTest, progressQuery } from './guest-self-test';
export { importBaseVm, resumeBaseVm, createOverlayVm, synthesizeVm, terminateVm, operationProgressQuery, type OperationProgress } from './operations';
export { rebuildOverlay } from './rebuild';
export { handoffVm, receiveHandoff, handoffProgressQuery, receiveStateQuery, roundArrivedUpdate, baseArrivedUpdate, completeUpdate, abortSignal, type ReceiveState, type HandoffProgress } from './handoff';
export { mobilityController, rttSamplesSignal, pauseSignal, stopSignal, setPolicyUpdate, moveNowUpdate, mobilityStateQuery, type MobilityState, type MobilityDecision, type MobilityInput } from './mobility';
export { refreshNeighbours } from './neighbours';
export { hostMonitor, hostStatsQuery, stopMonitorSignal } from './host-monitor';
export { reconcileHost, type ReconcileHostInput } from './reconcile';
export { warmPool, poolStateQuery, setPoolTargetSignal, poolChangedSignal, stopPoolSignal, type WarmPoolInput } from './warm-pool';
export { deployOverlay, type DeployOverlayInput, type DeployedVm, type HostDeployment } from './deployment';
