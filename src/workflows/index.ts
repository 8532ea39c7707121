// Every workflow the workers register. Workflows import activity *types* only.
export { guestSelfTest, progressQuery } from './guest-self-test';
